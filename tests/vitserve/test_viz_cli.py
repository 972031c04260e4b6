"""``vitserve viz`` without its extra names the extra and exits 2 (the server-side checks of the command
are in tests/serving/test_serving_attention.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vitserve import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("blocked", ["PIL", "matplotlib"])
def test_viz_without_its_extra_says_which_to_install(blocked: str) -> None:
    code = (f"import sys\nsys.modules[{blocked!r}] = None\n"
            "from vitserve.cli import main\nsys.exit(main(['viz', '--help']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("vitserve viz: needs the 'viz' extra: pip install 'vitserve[viz]' "
                                  f"(missing module {blocked}")
    assert "Traceback" not in done.stderr


def test_viz_is_registered_with_the_viz_extra() -> None:
    assert cli.COMMANDS["viz"][0] == "vitserve.viz_cli" and cli.EXTRAS["viz"] == "viz"
