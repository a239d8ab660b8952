import torch

from modelfleet.worker.prefix_cache import PrefixCache, block_keys, gather_plan

B = 4  # block size


def make(num_blocks: int) -> PrefixCache:
    return PrefixCache(num_layers=2, kv_heads=1, head_dim=2, block_size=B, num_blocks=num_blocks,
                       dtype=torch.float32, device=torch.device("cpu"))


def kv_of(tokens: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fake KV where each column holds its token id (keys) and its negation (values)."""
    t = torch.tensor(tokens, dtype=torch.float32)[None, :, None].expand(1, len(tokens), 2)
    return [t.clone(), t.clone() * 10], [-t.clone(), -t.clone() * 10]


def store(cache: PrefixCache, tokens: list[int]) -> int:
    return cache.store(tokens, *kv_of(tokens))


def test_keys_chain_over_the_whole_prefix():
    a = list(block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], B))
    b = list(block_keys([0, 2, 3, 4, 5, 6, 7, 8], B))
    assert len(a) == 2  # the partial last block has no key
    assert a[1][1] == a[0][0]  # each block names its parent
    assert a[1][2] == b[1][2] and a[1][0] != b[1][0]  # same tokens, different prefix, different key


def test_the_longest_cached_chain_is_matched_and_read_back():
    cache = make(8)
    assert store(cache, list(range(10))) == 2
    match = cache.match(list(range(8)) + [99, 98, 97, 96, 95])
    assert match.tokens == 8
    keys, values = cache.read(match, layer=1, count=6)
    assert keys[0, :, 0].tolist() == [0, 10, 20, 30, 40, 50]
    assert values[0, :, 0].tolist() == [0, -10, -20, -30, -40, -50]
    cache.release(match)
    assert cache.match([0, 1, 2, 9]).tokens == 0
    assert store(cache, list(range(12))) == 1  # only the new third block is written


def test_least_recently_used_goes_first_and_a_chain_loses_its_tail_first():
    cache = make(4)
    store(cache, [1] * 8)  # blocks a1, a2
    store(cache, [2] * 8)  # blocks b1, b2
    cache.release(cache.match([1] * 8))  # a is now the most recently used
    store(cache, [3] * 4)  # evicts b's tail
    assert cache.match([2] * 8).tokens == 4
    assert cache.match([1] * 8).tokens == 8


def test_pinned_blocks_are_never_evicted():
    cache = make(2)
    store(cache, [1] * 8)
    held = cache.match([1] * 8)
    assert store(cache, [2] * 8) == 0  # no room: everything is pinned
    assert cache.match([2] * 8).tokens == 0
    keys, _ = cache.read(held, layer=0, count=8)
    assert keys[0, :, 0].tolist() == [1] * 8
    cache.release(held)
    assert store(cache, [2] * 8) == 2
    assert cache.match([1] * 8).tokens == 0


def test_a_chain_longer_than_the_pool_keeps_its_head():
    cache = make(2)
    assert store(cache, list(range(16))) == 2
    assert cache.match(list(range(16))).tokens == 8


def test_prefills_over_cached_prefixes_are_grouped_by_tail_length():
    from modelfleet.worker.scheduler import plan_prefill_groups

    assert plan_prefill_groups([20, 3000, 18, 30, 25], slack=16) == [[2, 0, 4, 3], [1]]
    assert plan_prefill_groups([5, 5, 5], slack=0) == [[0, 1, 2]]
    assert plan_prefill_groups([], slack=16) == []


def test_the_pool_grows_to_its_budget_before_evicting():
    cache = PrefixCache(num_layers=2, kv_heads=1, head_dim=2, block_size=B, num_blocks=5, dtype=torch.float32,
                        device=torch.device("cpu"), initial_blocks=2)
    assert cache.keys[0].shape[0] == 2
    assert store(cache, list(range(20))) == 5
    assert cache.keys[0].shape[0] == 5
    match = cache.match(list(range(20)))
    keys, _ = cache.read(match, layer=0, count=20)
    assert keys[0, :, 0].tolist() == list(range(20))
    cache.release(match)
    assert store(cache, [7] * 8) == 2 and cache.match(list(range(20))).tokens == 12


def test_running_out_of_memory_while_growing_caps_the_pool(monkeypatch):
    cache = PrefixCache(num_layers=1, kv_heads=1, head_dim=2, block_size=B, num_blocks=8, dtype=torch.float32,
                        device=torch.device("cpu"), initial_blocks=2)

    def no_memory(blocks):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(cache, "_alloc", no_memory)
    assert store(cache, list(range(16))) == 2  # the two blocks it has, then it stops
    assert cache.num_blocks == 2
    assert store(cache, [5] * 8) == 2  # and from then on it evicts


def test_rows_on_one_system_prompt_gather_its_blocks_once():
    """Questions on one prompt, each with a block of its own (a question asked before): the
    gather holds the prompt's blocks once, and each row reads them as one run, then its own."""
    prompt = [10, 11, 12]
    order, runs = gather_plan([prompt + [20], prompt + [21], prompt + [20], prompt[:2]])
    assert order == [10, 11, 12, 20, 21]
    assert runs == [[(0, 0, 4)], [(0, 0, 3), (3, 4, 1)], [(0, 0, 4)], [(0, 0, 2)]]


def test_a_chain_out_of_the_gathers_order_is_read_in_pieces():
    order, runs = gather_plan([[1, 2, 3], [3, 2, 1], []])
    assert order == [1, 2, 3]
    assert runs == [[(0, 0, 3)], [(0, 2, 1), (1, 1, 1), (2, 0, 1)], []]
