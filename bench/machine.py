"""What the benchmarks print about the machine they ran on, and the CPU time of other processes.

Figures from a shared machine mean little without its CPU and its load: every benchmark prints both.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def cpu_description() -> str:
    """lscpu's model name, the core count and the SIMD flags that decide matmul speed."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "CPU unknown (no lscpu)"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = [f for f in fields.get("Flags", "").split() if f.startswith(("avx", "amx", "fma"))]
    hypervisor = fields.get("Hypervisor vendor", "").strip()
    where = f", {hypervisor} guest" if hypervisor else ""
    return f"{model}; {os.cpu_count()} cores{where}; flags {' '.join(flags)}"


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} cores"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_delay_s(pid: int, tid: int | None = None) -> float:
    """Seconds a thread (the main one by default) has spent runnable but waiting for a CPU (Linux
    schedstat): what other jobs on a shared machine have cost it."""
    fields = Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_text().split()
    return int(fields[1]) / 1e9
