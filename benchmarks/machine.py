"""What a benchmark ran on, for its JSON line: the test machines differ from session to session."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """Model name, core count and the ISA extensions that decide matmul speed (bf16, AMX)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = next(line for line in lines if line.startswith("flags"))
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f} " in flags + " "]
        return f"{name} ({os.cpu_count()} cores; {', '.join(isa)})"
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
