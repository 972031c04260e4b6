"""Reading the process table in the fate tests: what a survivor is called in a failure or a figure."""

from __future__ import annotations

from serving.process_table import ProcessInfo, alive, process_info


def describe(procs: list[ProcessInfo]) -> str:
    """One line per process: pid, parent now, command line."""
    lines = []
    for p in procs:
        now = process_info(p.pid) if alive(p) else None
        lines.append(f"  pid {p.pid} (ppid {now.ppid if now else 'gone'}): {' '.join(p.cmdline)[:160]}")
    return "\n".join(lines) or "  (none)"


def short_name(p: ProcessInfo) -> str:
    """``tritonserver``, ``triton_python_backend_stub``, ``ray::IDLE``, ``raylet``, ... for the figures."""
    first = p.cmdline[0] if p.cmdline else "?"
    if first.startswith("ray::"):
        return first.split()[0].split("(")[0].split(".")[0]
    name = first.rsplit("/", 1)[-1]
    if name.startswith("python") and len(p.cmdline) > 1:
        script = next((a for a in p.cmdline[1:] if not a.startswith("-")), "")
        return f"python {script.rsplit('/', 1)[-1]}"
    return name
