"""glibc malloc settings for a worker process: freed memory is kept for the next step's tensors.

Why: a step's large temporaries (a prefill's attention scores, 4 to 30 MB a layer) are freed and
allocated again at every layer. glibc returns such blocks to the kernel (mmap above a threshold
that it raises only up to 32 MB, and a trim of the heap's top), so the next allocation faults
every page in again, and first touches of memory are slow in the virtual machines that pods run
in: 0.25 to 1 GB/s here. With the settings below, 32 prefills of questions on a cached
1,500-token system prompt took 396 ms where they took 559 (the same with SDPA: 650 against 774),
and the attention alone 16 to 20 ms a layer where it took 45 to 50. vLLM's CPU build gets the same
from tcmalloc, which it preloads; PyTorch's CPU allocator has no cache of its own to turn on, and
a preloaded allocator would be one more library for every laptop user to install, so the worker
asks the C library it already runs on.

What it costs: memory freed at the top of the heap stays with the process (at most about as much
as one step's peak of temporaries); blocks over 32 MB (the KV cache's buffers) are still mapped
and unmapped on their own. A process that chose its allocator (LD_PRELOAD) or its malloc settings
(MALLOC_*_ or GLIBC_TUNABLES in the environment) is left as it is.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# mallopt(3) parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = {
    M_MMAP_THRESHOLD: 32 << 20,  # the largest glibc allows: blocks up to it come from the heap
    M_TRIM_THRESHOLD: 1 << 30,  # free memory at the heap's top that stays mapped
    M_TOP_PAD: 64 << 20,  # the heap grows by at least this much at a time
}


def chosen_elsewhere(environ: Mapping[str, str]) -> str | None:
    """Pure: the environment variable by which the process's owner already chose its allocator
    or its settings, or None."""
    for name in ("LD_PRELOAD", "GLIBC_TUNABLES"):
        if environ.get(name):
            return name
    return next((name for name in sorted(environ) if name.startswith("MALLOC_") and name.endswith("_")), None)


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Applies SETTINGS with mallopt; whether they took effect (not on other C libraries, nor
    where the environment chose otherwise)."""
    if not sys.platform.startswith("linux"):
        return False
    chosen = chosen_elsewhere(environ)
    if chosen:
        log.info("malloc left as %s sets it", chosen)
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())  # glibc returns 1, musl 0
    if applied:
        log.info("malloc keeps freed memory for reuse (mmap threshold 32 MB, trim threshold 1 GB)")
    return applied


# Below glibc's mmap threshold (as set above) a buffer comes from the heap, in pages the process
# already touched: a slot cache of 32 short rows grows by an eighth at a time, and fresh mappings
# for each of its 2-4 MB buffers took 32-client throughput from 1,043-1,521 to 706-1,070 tokens/s.
LAZY_ZEROS_MIN_BYTES = SETTINGS[M_MMAP_THRESHOLD]


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros that take memory only where they are written: on a CPU, a tensor over an anonymous
    private mapping, whose pages read as zero until touched; elsewhere, and under
    LAZY_ZEROS_MIN_BYTES, `torch.zeros`.

    Why: `torch.zeros` writes every byte at once, and the slot cache's buffers are sized for
    rows and columns that running sequences fill later or never (rows for a burst, columns for
    the longest row). Growing them for one 1,500-token prompt after a burst of 32 short ones
    zeroed 888 MB, 5 s of first touches in this VM. PyTorch's CPU allocator has no calloc path;
    the kernel's zero pages are what calloc would give. The mapping is unmapped when the tensor
    (which holds the mmap object) is freed."""
    import torch

    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes < LAZY_ZEROS_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype, count=numel).view(shape)
