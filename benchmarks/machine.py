"""The machine a benchmark ran on (``bench.machine``, re-exported for the reports)."""

from bench.machine import machine

__all__ = ["machine"]
