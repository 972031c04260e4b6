"""The export stage's two errors; every module of ``export/`` raises these and imports nothing else for them.

``ExportUsageError`` (the CLI exits 2): the request cannot be exported as asked - a bad option, run
directory, checkpoint or name, or an entry that already exists. ``ExportError`` (exit 1): an export was
attempted and failed a check (the ONNX exporter or checker, the parity gate).
"""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export could not be produced or failed its checks; the message says which and why."""


class ExportUsageError(ExportError, ValueError):
    """The user asked for something that cannot be exported (bad run dir, name, existing model...)."""
