"""Reading ``tritonserver``'s log: this launch's part of the file, its tail, and Triton's own error lines."""

from __future__ import annotations

import re
from pathlib import Path

_PORT_IN_USE = re.compile(r"address already in use|failed to start.*(grpc|http|metrics)", re.I)
# Lines Triton writes when a model fails, e.g.
# "E0101 ... model_lifecycle.cc:654] failed to load 'm' version 1: Internal: ..."
_ERROR_LINE = re.compile(r"^E\d{4} [^\]]*\] (.*)$")
# Error lines a CPU-only machine always produces; they say nothing about the models.
_EXPECTED_NOISE = ("CudaDriverHelper", "CUDA driver", "NVML", "DCGM")


class TritonLog:
    """The log file a launcher appends to across (re)starts; reads cover the latest launch only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def mark_launch(self) -> None:
        """A new launch writes from here on."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.path.stat().st_size if self.path.exists() else 0

    def text(self) -> str:
        """This launch's part of the log file."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def port_clash(self) -> bool:
        """Whether this launch failed because a port was taken (another process won a port race)."""
        return bool(_PORT_IN_USE.search(self.tail()))

    def errors(self) -> list[str]:
        """Triton's own error messages from this launch, first line of each, e.g.
        ``failed to load 'm' version 1: Internal: RuntimeError: ...``."""
        found: list[str] = []
        for line in self.text().splitlines():
            m = _ERROR_LINE.match(line)
            if not m or any(n in line for n in _EXPECTED_NOISE):
                continue
            text = m.group(1).strip().strip('"').replace("\\n", "\n")
            first = text.split("\n", 1)[0].strip()
            if first and first not in found:
                found.append(first)
        return found

    def failure_message(self, headline: str) -> str:
        """``headline``, then Triton's error lines and the log's last lines."""
        parts = [headline]
        errors = self.errors()
        if errors:
            parts.append("Triton reported:\n  " + "\n  ".join(errors))
        parts.append(f"last lines of {self.path}:\n{self.tail(15)}")
        return "\n".join(parts)
