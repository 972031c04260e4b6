# vitserve: `make demo` (train -> export -> serve -> query, end to end) and `make test`.
# Both create .venv on first use and reuse it afterwards; the data step installs Fashion-MNIST
# (Debian package dataset-fashion-mnist) when it is missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test data venv protos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	@touch $(STAMP)

data: $(STAMP)
	$(PY) -m training.ensure_data

demo: data
	$(VENV)/bin/vitserve demo

test: data
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

protos: $(STAMP)
	$(PY) -m protos.generate

clean:
	rm -rf .demo .pytest_cache
