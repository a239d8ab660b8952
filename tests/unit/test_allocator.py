"""The worker's malloc settings (worker/allocator.py): applied on glibc, and never over an
allocator or settings that the process's owner chose in its environment."""

import ctypes
import sys

import pytest

from modelfleet.worker.allocator import chosen_elsewhere, keep_freed_memory


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
