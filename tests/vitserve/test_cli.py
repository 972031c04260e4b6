import subprocess
import sys
from pathlib import Path

from vitserve import cli

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_exit_code_2(capsys):
    assert cli.main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_every_command_resolves_to_a_callable():
    import importlib

    for module, func, _ in cli.COMMANDS.values():
        assert callable(getattr(importlib.import_module(module), func))


def test_client_commands_do_not_import_torch():
    code = ("import sys; import clients.commands, clients.client; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
