"""The machine line every benchmark prints first: figures mean little without it."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """1-, 5- and 15-minute load averages: on a shared box they say how much the figures can be trusted."""
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{cpu_model()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}, load average {load_average()}")
