"""What the machine is, for the headers of reports and benchmark output (one place for it)."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux); the platform's guess elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
