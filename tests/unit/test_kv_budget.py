"""The slot cache's buffers stay within the KV budget while rows join, grow and leave."""

import os

import pytest
import torch

from modelfleet.worker.kvcache import SlotPool, cache_over_past


def pool(budget: int) -> SlotPool:
    return SlotPool(num_layers=1, kv_heads=1, head_dim=2, max_rows=8, max_columns=1000, dtype=torch.float32,
                    device=torch.device("cpu"), initial_columns=4, budget_tokens=budget, initial_rows=1)


def prefill(lengths: list[int]):
    width = max(lengths)
    cache = cache_over_past(1, len(lengths), 1, width, 2, width, torch.float32, torch.device("cpu"))
    for i, n in enumerate(lengths):  # row i holds the values 1..n, right-aligned
        cache.layers[0].keys[i, 0, width - n :, :] = torch.arange(1, n + 1, dtype=torch.float32)[:, None]
    return cache


def test_rows_join_and_grow_within_the_budget_and_keep_their_kv():
    p = pool(budget=60)
    p.add_rows(prefill([5, 3]), [5, 3], [0, 1])
    for _ in range(6):
        p.reserve(1)
        p.advance(1)
        assert p.allocated_tokens() <= 60
    p.add_rows(prefill([9]), [9], [0])
    p.reserve(1)
    assert p.allocated_tokens() <= 60
    assert p.keys[0][2, 0, p.starts[2] : p.cursor, 0].tolist() == list(range(1, 10))
    assert p.keys[0][1, 0, p.starts[1] : p.starts[1] + 3, 0].tolist() == [1, 2, 3]
    assert p.used_tokens() == 11 + 9 + 9


def test_rows_held_for_sequences_that_left_give_way_to_longer_ones():
    p = pool(budget=100)
    p.add_rows(prefill([3] * 8), [3] * 8, list(range(8)))  # 8 rows of at least 4 columns
    for row in range(7, 0, -1):
        p.remove_row(row)
    p.add_rows(prefill([40]), [40], [0])  # 2 rows of 41+ columns: the row capacity shrinks
    assert p.rows == 2 and p.columns >= 41 and p.allocated_tokens() <= 100
    assert p.keys[0][1, 0, p.starts[1] : p.cursor, 0].tolist() == list(range(1, 41))


def test_growing_past_the_budget_is_refused_not_allocated():
    p = pool(budget=20)
    with pytest.raises(RuntimeError, match="budget"):
        p.add_rows(prefill([15, 15]), [15, 15], [0, 1])


def test_the_default_budget_is_40_percent_of_free_memory_within_the_cgroup_and_at_most_32_gib(monkeypatch):
    from modelfleet.worker import kvcache

    cpu = torch.device("cpu")
    monkeypatch.setattr(kvcache, "_cgroup_room", lambda: None)
    assert kvcache._available_memory() > 0
    monkeypatch.setattr(kvcache, "_cgroup_room", lambda: 1 << 30)  # a pod with 1 GiB left under its limit
    assert kvcache._available_memory() <= 1 << 30
    assert kvcache.default_kv_cache_bytes(cpu) <= 0.4 * (1 << 30) + 1
    monkeypatch.setattr(kvcache, "_available_memory", lambda: 200 << 30)
    assert kvcache.default_kv_cache_bytes(cpu) == 32 << 30


def test_full_width_buffers_give_back_columns_a_long_row_left_and_keep_the_rows_kv():
    """With `full_width` every decode step reads all allocated columns: once a long row has left,
    the buffers shrink to what the rows need (a quarter's hysteresis), their KV intact."""
    p = SlotPool(num_layers=1, kv_heads=1, head_dim=2, max_rows=4, max_columns=4096, dtype=torch.float32,
                 device=torch.device("cpu"), initial_rows=2, full_width=True)
    p.add_rows(prefill([1500, 5]), [1500, 5], [0, 1])
    p.ready_for_decode()
    wide = p.columns
    assert wide >= 1501
    p.advance(1)
    p.remove_row(0)  # the long one leaves; the short one, 6 tokens, stays near the cursor
    p.add_rows(prefill([9]), [9], [0])
    p.ready_for_decode()
    assert p.columns < 100 and p.cursor < 20, (p.columns, p.cursor)
    assert p.keys[0][0, 0, p.starts[0] : p.starts[0] + 5, 0].tolist() == [1, 2, 3, 4, 5]
    assert p.keys[0][1, 0, p.starts[1] : p.cursor, 0].tolist() == list(range(1, 10))
    columns = p.columns
    for _ in range(3 * columns):  # growing again from there grows by an eighth, not back to `wide`
        p.ready_for_decode()
        assert p.cursor < p.columns <= max(columns, p.cursor + max(32, p.cursor // 8) + 1)
        p.advance(1)


def test_without_full_width_the_columns_stay():
    p = pool(budget=10_000)
    p.add_rows(prefill([900]), [900], [0])
    p.ready_for_decode()
    wide = p.columns
    p.remove_row(0)
    p.add_rows(prefill([5]), [5], [0])
    p.ready_for_decode()
    assert p.columns == wide


def test_a_long_row_after_a_shrink_grows_into_the_memory_the_shrink_left():
    """Pages given back at a shrink cost a burst of long prompts its first touches again: the
    growth that follows lays its buffers out in the ones the shrink replaced, zeroed where no row
    wrote (the long row that left, values up to 1,500, must not show through as padding)."""
    p = SlotPool(num_layers=1, kv_heads=1, head_dim=2, max_rows=4, max_columns=4096, dtype=torch.float32,
                 device=torch.device("cpu"), initial_rows=2, full_width=True)
    p.add_rows(prefill([5, 1500]), [5, 1500], [0, 1])
    p.ready_for_decode()
    wide = p.keys[0].data_ptr()
    p.advance(1)
    p.remove_row(1)  # the last row: its KV stays where it was
    p.ready_for_decode()
    assert p.columns < 100  # shrunk
    p.add_rows(prefill([1200]), [1200], [0])
    p.ready_for_decode()
    assert p.columns >= 1201 and p.keys[0].data_ptr() == wide
    short, long_ = p.keys[0][0, 0, :, 0], p.keys[0][1, 0, :, 0]
    assert short[p.starts[0] : p.starts[0] + 5].tolist() == [1, 2, 3, 4, 5]
    assert long_[p.starts[1] : p.cursor].tolist() == list(range(1, 1201))
    assert p.keys[0].max() <= 1200 and not long_[p.cursor :].any()


def test_one_long_row_takes_memory_for_itself_not_for_every_row_the_buffers_hold():
    """Buffers sized for 32 rows (a burst came before) grown for one 1,500-token row: only that
    row's pages are taken, not the 32 rows' 100 MB."""
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    p = SlotPool(num_layers=1, kv_heads=8, head_dim=64, max_rows=32, max_columns=4096, dtype=torch.bfloat16,
                 device=torch.device("cpu"), initial_rows=32, initial_columns=64)
    p.add_rows(cache_over_past(1, 1, 8, 1500, 64, 1500, torch.bfloat16, torch.device("cpu")), [1500], [0])
    assert p.keys[0].nbytes >= 32 << 20  # each buffer over glibc's mmap threshold
    with open("/proc/self/statm") as f:
        grown = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") - before
    assert grown < 24 << 20, grown  # the row's K and V: 3 MB; its prefill buffers: 3 MB more
