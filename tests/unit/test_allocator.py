"""The worker's malloc settings (worker/allocator.py): applied on glibc, and never over an
allocator or settings that the process's owner chose in its environment."""

import ctypes
import os
import sys

import pytest

from modelfleet.worker.allocator import chosen_elsewhere, keep_freed_memory, lazy_zeros


@pytest.mark.parametrize(("environ", "chosen"), [
    ({}, None),
    ({"PATH": "/usr/bin", "MALLOC": "x"}, None),
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, "LD_PRELOAD"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES"),
    ({"MALLOC_ARENA_MAX": "2"}, None),  # not an allocator setting: "MALLOC_..._" ends in an underscore
    ({"MALLOC_ARENA_MAX_": "2"}, "MALLOC_ARENA_MAX_"),
    ({"LD_PRELOAD": ""}, None),
])
def test_an_allocator_chosen_in_the_environment_is_respected(environ, chosen):
    assert chosen_elsewhere(environ) == chosen
    if chosen:
        assert keep_freed_memory(environ) is False


def is_glibc() -> bool:
    try:
        return ctypes.CDLL(None).gnu_get_libc_version is not None
    except AttributeError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not is_glibc(), reason="mallopt's settings are glibc's")
def test_glibc_takes_the_settings():
    assert keep_freed_memory({}) is True


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_lazy_zeros_take_memory_only_where_written():
    """A 256 MB buffer of zeros costs nothing resident until rows are written, and reads as
    zeros (finite padding) everywhere else."""
    import torch

    before = _resident_bytes()
    buf = lazy_zeros((64, 8, 4096, 64), torch.bfloat16, torch.device("cpu"))
    assert _resident_bytes() - before < 16 << 20
    buf[3] = 1.5
    grown = _resident_bytes() - before
    assert 3 << 20 < grown < 24 << 20  # one row: 4 MB
    assert buf.is_contiguous() and buf.dtype == torch.bfloat16
    assert buf.float().sum().item() == 1.5 * 8 * 4096 * 64
    assert not buf[:3].any() and not buf[4:].any()


def test_small_lazy_zeros_are_plain_zeros():
    import torch

    small = lazy_zeros((4, 4), torch.float32, torch.device("cpu"))
    assert torch.equal(small, torch.zeros(4, 4)) and small.untyped_storage().resizable()
