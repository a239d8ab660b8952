"""Decode attention as matmuls (worker/kvcache.py `decode_attention`) against PyTorch's SDPA on
random tensors: bfloat16 with a padding mask, grouped-query heads, and the slot pool's whole-row
view, where the columns right of the cursor hold stale KV that the mask must hide; and cascade
attention (`shared_prefix_attention`) for decode steps and prefills of rows on one prefix."""

import pytest
import torch
import torch.nn.functional as F

from modelfleet.worker.kvcache import (
    SlotPool,
    decode_attention,
    decodes_by_matmul,
    shared_layout,
    shared_prefix_attention,
)


def sdpa(query, key, value, mask):
    """The reference: SDPA in float32 on the same bfloat16 inputs, heads repeated for GQA, laid
    out [rows, 1, heads, D] as transformers' attention functions return it."""
    group = query.shape[1] // key.shape[1]
    key, value = (t.float().repeat_interleave(group, dim=1) for t in (key, value))
    out = F.scaled_dot_product_attention(query.float(), key, value, attn_mask=mask.float())
    return out.transpose(1, 2)


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (8, 2), (4, 1)])
def test_decode_attention_equals_sdpa_with_a_mask_and_grouped_heads(heads, kv_heads):
    torch.manual_seed(0)
    rows, columns, dim = 5, 37, 64
    query = torch.randn(rows, heads, 1, dim).bfloat16()
    key, value = (torch.randn(rows, kv_heads, columns, dim).bfloat16() for _ in range(2))
    starts = torch.tensor([0, 3, 10, 36, 20])  # each row's padding, left of its start
    mask = torch.zeros(rows, columns).masked_fill_(torch.arange(columns) < starts[:, None], torch.finfo(torch.float32).min)
    got = decode_attention(query, key, value, mask[:, None, None, :])
    assert got.shape == (rows, 1, heads, dim) and got.dtype == torch.bfloat16
    # bfloat16 has 8 bits of mantissa: the products and the weights round at about 4e-3 relative
    torch.testing.assert_close(got.float(), sdpa(query, key, value, mask[:, None, None, :]), rtol=2e-2, atol=2e-2)
    alone = decode_attention(query[3:4], key[3:4, :, 36:], value[3:4, :, 36:], None)  # all but one masked
    torch.testing.assert_close(got[3], alone[0], rtol=0, atol=0)


def test_the_pools_whole_rows_hide_the_columns_right_of_the_cursor():
    """With `full_width`, a decode step attends to every allocated column; what lies right of the
    cursor (here large stale values) must weigh nothing, so the result is the attention over the
    rows' own tokens alone."""
    torch.manual_seed(1)
    pool = SlotPool(num_layers=1, kv_heads=2, head_dim=16, max_rows=4, max_columns=64, dtype=torch.bfloat16,
                    device=torch.device("cpu"), initial_columns=32, full_width=True)
    pool.open_rows([7, 12, 3])
    pool.keys[0].normal_().mul_(4)
    pool.values[0].normal_().mul_(4)
    pool.keys[0][:, :, pool.cursor + 1 :] = 1e4  # stale: would dominate if it were attended
    query = torch.randn(3, 4, 1, 16).bfloat16()
    k, v = pool.write(0, torch.randn(3, 2, 1, 16).bfloat16(), torch.randn(3, 2, 1, 16).bfloat16())
    assert k.shape[2] == pool.columns > pool.cursor + 1 and k.is_contiguous()
    mask = pool.decode_mask(torch.bfloat16)
    assert mask.shape == (3, 1, 1, pool.columns)
    got = decode_attention(query, k, v, mask, scaling=0.25)
    end = pool.cursor + 1
    for row, start in enumerate(pool.starts):
        alone = decode_attention(query[row : row + 1], k[row : row + 1, :, start:end], v[row : row + 1, :, start:end],
                                 None, scaling=0.25)
        torch.testing.assert_close(got[row], alone[0], rtol=1e-2, atol=1e-2)


def grouped_pool(lengths: list[int]) -> SlotPool:
    pool = SlotPool(num_layers=1, kv_heads=2, head_dim=16, max_rows=40, max_columns=4096, dtype=torch.bfloat16,
                    device=torch.device("cpu"), initial_rows=40, full_width=True)
    pool.open_rows(lengths)
    pool.ready_for_decode()
    return pool


def test_rows_of_very_different_lengths_attend_by_groups_with_the_same_result():
    """One long row among short ones: the step's attention reads the long row whole and the short
    rows over their own columns only (SlotPool.decode_groups), and every row's result is what
    whole-row attention gives, with the stale columns right of the cursor still hidden."""
    torch.manual_seed(2)
    lengths = [1500, *range(20, 51)]  # 32 rows, the long one first
    lengths[0], lengths[7] = lengths[7], lengths[0]  # ... anywhere in the batch
    pool = grouped_pool(lengths)
    pool.keys[0].normal_().mul_(4)
    pool.values[0].normal_().mul_(4)
    pool.keys[0][:, :, pool.cursor + 1 :] = 1e4
    groups = pool.decode_groups()
    assert groups is not None and [sorted(g.rows.tolist()) for g in groups] == [[7], [i for i in range(32) if i != 7]]
    end = pool.cursor + 1
    assert [(g.start, g.end) for g in groups] == [(end - 1501, end), (end - 51, end)]
    query = torch.randn(32, 4, 1, 16).bfloat16()
    k, v = pool.write(0, torch.randn(32, 2, 1, 16).bfloat16(), torch.randn(32, 2, 1, 16).bfloat16())
    mask = pool.decode_mask(torch.bfloat16)
    whole = decode_attention(query, k, v, mask, scaling=0.25)
    torch.testing.assert_close(decode_attention(query, k, v, mask, scaling=0.25, groups=groups), whole,
                               rtol=1e-2, atol=1e-2)


def test_rows_that_share_a_prefix_read_one_copy_of_it_with_the_same_result():
    """Cascade attention: 12 rows whose first 200 tokens hold the same KV (one system prompt,
    copied from the prefix cache) and whose own tokens after it differ in number; every row's
    result is what attending to its whole row gives, the stale columns right of the cursor hidden."""
    torch.manual_seed(3)
    own = [5, 30, 1, 17, 9, 22, 3, 40, 12, 8, 26, 2]
    pool = grouped_pool([200 + n for n in own])
    pool.keys[0].normal_().mul_(4)
    pool.values[0].normal_().mul_(4)
    for store in (pool.keys[0], pool.values[0]):
        prefix = torch.randn(2, 200, 16).bfloat16() * 4
        for row, start in enumerate(pool.starts):
            store[row, :, start : start + 200] = prefix
    pool.keys[0][:, :, pool.cursor + 1 :] = 1e4
    query = torch.randn(12, 4, 1, 16).bfloat16()
    k, v = pool.write(0, torch.randn(12, 2, 1, 16).bfloat16(), torch.randn(12, 2, 1, 16).bfloat16())
    mask = pool.decode_mask(torch.bfloat16)
    shared = pool.shared_prefix(200, torch.bfloat16)
    whole = decode_attention(query, k, v, mask, scaling=0.25)
    torch.testing.assert_close(decode_attention(query, k, v, mask, scaling=0.25, shared=shared), whole,
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (8, 2)])
def test_a_prefill_of_rows_on_one_prefix_reads_one_copy_of_it_with_the_same_result(heads, kv_heads):
    """Cascade attention in a prefill of prefix hits (engine._prefill_shared_prefix): seven
    left-padded rows whose first 96 tokens hold the same KV, each with its own tokens after it,
    of which the last 6 columns are the queries; every query's result is causal attention over its
    own row, padding and prefix included, as SDPA computes it over the whole rows."""
    torch.manual_seed(4)
    prefix, queries, dim = 96, 6, 32
    lengths = [prefix + n for n in (6, 30, 11, 6, 19, 8, 25)]  # own tokens: at least the queries
    width, rows = max(lengths), len(lengths)
    starts = [width - n for n in lengths]
    key, value = (torch.randn(rows, kv_heads, width, dim).bfloat16() * 2 for _ in range(2))
    for store in (key, value):
        copy = torch.randn(kv_heads, prefix, dim).bfloat16() * 2
        for row, start in enumerate(starts):
            store[row, :, :start] = 1e4  # padding: would dominate if it were attended
            store[row, :, start : start + prefix] = copy
    query = torch.randn(rows, heads, queries, dim).bfloat16()
    shared = shared_layout(starts, width, queries, prefix, torch.bfloat16, torch.device("cpu"))
    got = shared_prefix_attention(query, key, value, shared, scaling=None)
    assert got.shape == (rows, queries, heads, dim) and got.dtype == torch.bfloat16
    columns, asked = torch.arange(width), torch.arange(width - queries, width)
    seen = (columns[None, None, :] >= torch.tensor(starts)[:, None, None]) & (columns[None, None, :] <= asked[None, :, None])
    mask = torch.zeros(seen.shape).masked_fill_(~seen, torch.finfo(torch.float32).min)[:, None]
    # the scores round to bfloat16 before the softmax, as in transformers' eager attention: one of
    # ~10,000 results is off by 0.04 here
    torch.testing.assert_close(got.float(), sdpa(query, key, value, mask), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("lengths", [[3], [40, 38, 45, 41], [300, 290, 310, 20], [60, 5, 7, 9]])
def test_rows_read_whole_unless_groups_read_under_half_the_bytes(lengths):
    """Rows of similar lengths, or too few columns left out to pay for the copies: whole rows."""
    assert grouped_pool(lengths).decode_groups() is None


def test_only_bfloat16_on_cpu_without_window_softcap_or_sinks_decodes_by_matmul():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig

    cpu = torch.device("cpu")
    assert decodes_by_matmul(LlamaConfig(), torch.bfloat16, cpu)
    assert not decodes_by_matmul(LlamaConfig(), torch.float32, cpu)  # float32: SDPA is as fast
    assert not decodes_by_matmul(LlamaConfig(), torch.bfloat16, torch.device("cuda"))
    assert not decodes_by_matmul(MistralConfig(sliding_window=4096), torch.bfloat16, cpu)
    assert not decodes_by_matmul(Gemma2Config(), torch.bfloat16, cpu)  # sliding layers, softcapping
