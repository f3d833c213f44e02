"""Wall-clock timing of one call, on CPU or with CUDA events (shared with ``bench/dit_gpu.py``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function timing one call in milliseconds (CUDA events on a GPU, so queued work counts)."""

    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000

    return run


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation."""
    data = sorted(samples)
    if not data:
        raise ValueError("no samples")
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))
