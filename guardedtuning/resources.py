"""What this process used: peak resident memory and peak GPU memory (for the cost figures)."""

from __future__ import annotations

import resource

import torch


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def gpu_peak_mb() -> float | None:
    """Peak GPU memory torch allocated in this process (None when it used no GPU)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20
