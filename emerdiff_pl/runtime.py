"""Runtime policy of the segmenter: how much runs per call, what to do on OOM, dtype, layout, compile, backend.

None of this changes what is computed (docs/method.md §8: results do not depend on batch or chunk size); it
decides how fast it runs and how much memory it takes. emerdiff_pl.method reads none of it except the chunk
sizes it is handed and `with_oom_halving`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

import torch
from torch import nn

from emerdiff_pl.config import DType
from emerdiff_pl.layout import GroupNormKernel, to_channels_last

log = logging.getLogger(__name__)

T = TypeVar("T")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_MAX_ROWS_512 = 16  # max_branch_batch=auto on CUDA: branch rows per U-Net call at 512² (scaled by area)
CPU_ROWS = 32  # max_branch_batch=auto on the CPU


def compute_dtype(name: DType, device: torch.device) -> torch.dtype:
    """`auto` = bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def auto_branch_rows(free_bytes: int, resolution: int | tuple[int, int], itemsize: int = 2) -> int:
    """`max_branch_batch: auto` on CUDA: branch rows per U-Net call from free device memory.

    `resolution`: the side of the square model input, or its (h, w) (keep_aspect, short_side inputs).
    At most 16 rows at 512² (scaled by area): an H200 gives the same rows/s at 16, 24 and 40 rows while peak
    memory grows 6.9 → 12.5 GB (BENCHMARKS.md). The memory bound keeps a conservative 1.2 GB per 512² row in
    bf16 within 70 % of free memory (measured: ≈ 0.3 GB); a CUDA OOM still halves the chunk and retries.
    """
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    area = h * w / 512**2
    per_row = 1.2e9 * area * itemsize / 2
    return max(2, min(int(AUTO_MAX_ROWS_512 / area), int(0.7 * free_bytes / per_row)))


def rows_per_call(
    setting: int | Literal["auto"],
    device: torch.device,
    resolution: int | tuple[int, int],
    dtype: torch.dtype,
) -> int:
    """U-Net rows per call: `max_branch_batch`, or for `auto` from free CUDA memory (32 on the CPU)."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return CPU_ROWS
    free, _ = torch.cuda.mem_get_info(device)
    return auto_branch_rows(free, resolution, dtype.itemsize)


def branch_chunk(rows: int, total: int, two_sided: bool) -> int:
    """Branch rows per chunk: at most `rows` and `total`, even when two-sided (both signs of a mask together)."""
    chunk = min(rows, total)
    if two_sided:
        chunk = max(2, chunk - chunk % 2)
    return max(1, chunk)


def with_oom_halving(n: int, run: Callable[[int], T], what: str, even: bool = False) -> T:
    """`run(n)`; after a CUDA out-of-memory error free the cache and retry with n halved (even: ≥ 2, keeping
    both signs of a mask together), until n cannot shrink. `run` must resume, not redo, finished work."""
    minimum = 2 if even else 1
    while True:
        try:
            return run(n)
        except torch.OutOfMemoryError:
            if n <= minimum:
                raise
            new = max(minimum, n // 2)
            if even:
                new = max(2, new - new % 2)
            log.warning("CUDA out of memory with %d %s per call; retrying with %d", n, what, new)
            torch.cuda.empty_cache()
            n = new


def apply_channels_last(modules: Iterable[nn.Module | None], group_norm: GroupNormKernel = "auto") -> None:
    """Channels-last weights and NHWC-keeping GroupNorm / attention blocks (emerdiff_pl.layout); CUDA only."""
    for module in modules:
        if module is not None:
            to_channels_last(module, group_norm=group_norm)


def compile_modules(modules: Iterable[nn.Module]) -> None:
    """`torch.compile` in place, lazily at the first call. dynamic=None: a second batch size recompiles once
    with a symbolic batch (latent H, W stay static), so chunks of any size share one graph."""
    for module in modules:
        module.compile(dynamic=None)


__all__ = [
    "AUTO_MAX_ROWS_512",
    "apply_channels_last",
    "auto_branch_rows",
    "branch_chunk",
    "compile_modules",
    "compute_dtype",
    "rows_per_call",
    "with_oom_halving",
]
