#!/usr/bin/env bash
# Rerun the suite's timing-sensitive and server tests N times with a CPU hog busy on one core, and
# print every failure. Run it before a submission that touches serving/, a fixture that starts a
# server, or anything that waits on a clock (README, "Development").
#
#   tests/flake_check.sh                 # 3 rounds of the default selection
#   tests/flake_check.sh 5 tests/serving/test_serving_guards.py -k metrics
#
# Exit status: 0 when every round passed, 1 otherwise. Logs: .flake_check/round-K.log
set -uo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
shift || true
PY="${PYTHON:-.venv/bin/python}"
# Default: every test that starts Triton, a gateway, Ray or a subprocess server, or that runs on a
# time budget.
selection=("$@")
if [ ${#selection[@]} -eq 0 ]; then
    selection=(tests/serving tests/reliability tests/embed_dataset tests/training/test_train.py
               tests/clients tests/probes/test_probes_service.py tests/vitserve tests/bench)
fi
mkdir -p .flake_check
"$PY" -c 'while True: pass' &
hog=$!
trap 'kill $hog 2>/dev/null' EXIT
failed=0
for k in $(seq 1 "$rounds"); do
    start=$(date +%s)
    if "$PY" -m pytest -q -p no:cacheprovider -rfE "${selection[@]}" > ".flake_check/round-$k.log" 2>&1; then
        echo "round $k/$rounds: passed in $(( $(date +%s) - start )) s ($(tail -n 1 ".flake_check/round-$k.log"))"
    else
        failed=1
        echo "round $k/$rounds: FAILED in $(( $(date +%s) - start )) s; log .flake_check/round-$k.log"
        grep -E "^(FAILED|ERROR) " ".flake_check/round-$k.log" | sed 's/^/    /'
        tail -n 1 ".flake_check/round-$k.log" | sed 's/^/    /'
    fi
done
exit $failed
