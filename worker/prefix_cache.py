"""Prompt-prefix KV reuse: the KV of full blocks of prompt tokens, keyed by a hash chained over
everything before them, so that a prompt that starts like an earlier one skips recomputing it.

Written by hand because the slot cache (kvcache.py) keeps each sequence in one contiguous row, so
blocks cannot be shared in place as vLLM's paged attention shares them; this pool keeps copies.
A block's key is hash(parent's key, its token ids), so one key names a whole prefix, and the
longest run of cached keys from a prompt's start is KV the prompt can reuse. Blocks that an
admission is about to read are pinned (a reference count) so that storing another prompt's blocks
cannot evict them; unpinned blocks stay until the pool is full, then the least recently used goes
first, and of one prompt's chain the tail before the head (as in vLLM).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Block:
    index: int  # row in the pool's buffers
    key: int | None = None  # None while free
    parent: int = 0
    tokens: tuple[int, ...] = ()
    refs: int = 0


@dataclass
class PrefixMatch:
    """Pinned blocks of one prompt's cached prefix; give it back with `PrefixCache.release`."""

    blocks: list[Block] = field(default_factory=list)
    block_size: int = 0

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block_size


def block_keys(token_ids: Sequence[int], block_size: int,
               salt: str | None = None) -> Iterator[tuple[int, int, tuple[int, ...]]]:
    """(key, parent key, tokens) of each full block of `token_ids`, in order (lazily: a lookup
    that misses early hashes no further). `salt` (a LoRA adapter's key) starts the chain
    elsewhere: KV computed under an adapter differs from the base model's for the same tokens."""
    parent = 0 if salt is None else hash(("adapter", salt))
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = tuple(token_ids[start : start + block_size])
        key = hash((parent, tokens))
        yield key, parent, tokens
        parent = key


def gather_plan(chains: list[list[int]]) -> tuple[list[int], list[list[tuple[int, int, int]]]]:
    """How to read the blocks of several rows' chains (pool indices, in row order) with one gather
    that holds each block once: the gather's block order, and for each chain its runs of blocks
    that lie consecutively in the gather, as (first block of the chain, its place in the gather,
    how many). Rows on one system prompt share its blocks and differ after it: 32 questions,
    each repeated, hit 93 shared blocks and one of their own, and a gather of whole chains read
    every row's copy of the prompt (47 MB a layer, fresh pages on every admission)."""
    place: dict[int, int] = {}
    runs: list[list[tuple[int, int, int]]] = []
    for chain in chains:
        row: list[tuple[int, int, int]] = []
        for j, block in enumerate(chain):
            at = place.setdefault(block, len(place))
            if row and row[-1][1] + row[-1][2] == at:
                first, start, count = row[-1]
                row[-1] = (first, start, count + 1)
            else:
                row.append((j, at, 1))
        runs.append(row)
    return list(place), runs


class PrefixCache:
    """A pool of up to `num_blocks` blocks: per layer, keys and values [blocks, kv_heads,
    block_size, head_dim]; a key -> block; the unpinned cached blocks in LRU order."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, block_size: int, num_blocks: int,
                 dtype: torch.dtype, device: torch.device, initial_blocks: int = 64) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the prefix cache needs at least one block of at least one token")
        self.block_size = block_size
        self.num_blocks = num_blocks  # the budget; the buffers grow to it as prompts are stored
        self.shape = (kv_heads, block_size, head_dim)
        self.dtype = dtype
        self.device = device
        self.keys = [self._alloc(min(num_blocks, initial_blocks)) for _ in range(num_layers)]
        self.values = [self._alloc(min(num_blocks, initial_blocks)) for _ in range(num_layers)]
        self.blocks = [Block(i) for i in range(self.keys[0].shape[0])]
        self.free: list[Block] = self.blocks[::-1]
        self.by_key: dict[int, Block] = {}
        self.idle: OrderedDict[int, Block] = OrderedDict()  # cached, unpinned; least recent first

    def _alloc(self, blocks: int) -> torch.Tensor:
        return torch.empty((blocks, *self.shape), dtype=self.dtype, device=self.device)

    def _grow(self) -> None:
        """Doubles the buffers, up to the budget: memory is taken when prompts need it, not at start."""
        old = len(self.blocks)
        size = min(self.num_blocks, 2 * old)
        keys = [torch.cat([buf, self._alloc(size - old)]) for buf in self.keys]
        values = [torch.cat([buf, self._alloc(size - old)]) for buf in self.values]
        self.keys, self.values = keys, values  # only once every layer has grown
        added = [Block(i) for i in range(old, size)]
        self.blocks += added
        self.free = added[::-1] + self.free

    @property
    def cached_blocks(self) -> int:
        return len(self.by_key)

    def match(self, token_ids: Sequence[int], salt: str | None = None) -> PrefixMatch:
        """Pins and returns the longest cached chain of full blocks that `token_ids` starts with."""
        found = PrefixMatch(block_size=self.block_size)
        for key, parent, tokens in block_keys(token_ids, self.block_size, salt):
            block = self._lookup(key, parent, tokens)
            if block is None:
                break
            self._pin(block)
            found.blocks.append(block)
        return found

    def release(self, match: PrefixMatch) -> None:
        """Unpins; the tail goes into the LRU order first, so it is evicted before the head."""
        for block in reversed(match.blocks):
            block.refs -= 1
            if block.refs == 0 and block.key is not None:
                self.idle[block.index] = block
        match.blocks = []

    def read(self, match: PrefixMatch, layer: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [kv_heads, count, head_dim] of the first `count` matched tokens."""
        used = -(-count // self.block_size)
        index = torch.tensor([b.index for b in match.blocks[:used]], device=self.keys[layer].device)
        out = []
        for store in (self.keys, self.values):
            chunk = store[layer].index_select(0, index)  # [used, heads, block, dim]
            out.append(chunk.transpose(0, 1).reshape(chunk.shape[1], -1, chunk.shape[3])[:, :count])
        return out[0], out[1]

    def write_past(self, keys: list[torch.Tensor], values: list[torch.Tensor], matches: list[PrefixMatch],
                   reused: list[int], past: int) -> None:
        """Fills the first `past` columns of a prefill's per-layer buffers [rows, kv_heads, columns,
        head_dim]: row i gets its first `reused[i]` cached tokens right-aligned at `past`, zeros
        left of them (padding: masked, but it must be finite). Per layer, one gather reads every
        block the rows use once (`gather_plan`), and each row's runs of blocks are copied from it
        block-major, converted to the buffers' dtype on the way, with no reshape."""
        size = self.block_size
        order, runs = gather_plan([[b.index for b in m.blocks[: -(-count // size)]]
                                   for m, count in zip(matches, reused, strict=True)])
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        for layer in range(len(keys)):
            for buf, store in ((keys[layer], self.keys), (values[layer], self.values)):
                cached = store[layer].index_select(0, index) if order else None  # [blocks, heads, block, dim]
                for i, count in enumerate(reused):
                    start = past - count
                    buf[i, :, :start] = 0
                    full, rest = divmod(count, size)
                    for first, at, blocks in runs[i]:  # the run's columns seen as [heads, blocks, block, dim]
                        whole = min(blocks, full - first)  # a partial last block is copied below
                        if whole > 0:
                            cols = start + first * size
                            buf[i, :, cols : cols + whole * size].unflatten(1, (whole, size)).copy_(
                                cached[at : at + whole].transpose(0, 1))
                    if rest:
                        first, at, blocks = runs[i][-1]
                        buf[i, :, past - rest : past] = cached[at + full - first, :, :rest]

    def store(self, token_ids: Sequence[int], keys: list[torch.Tensor], values: list[torch.Tensor],
              salt: str | None = None) -> int:
        """Caches the full blocks of `token_ids` that are not cached yet; `keys[layer]` and
        `values[layer]` are [kv_heads, len(token_ids), head_dim]. Stops at the first block with no
        room (every block pinned). Returns how many blocks were added."""
        chain = PrefixMatch(block_size=self.block_size)
        added = 0
        try:
            for j, (key, parent, tokens) in enumerate(block_keys(token_ids, self.block_size, salt)):
                block = self._lookup(key, parent, tokens)
                if block is None:
                    block = self._take()
                    if block is None:
                        break
                    cols = slice(j * self.block_size, (j + 1) * self.block_size)
                    for layer in range(len(self.keys)):
                        self.keys[layer][block.index] = keys[layer][:, cols]
                        self.values[layer][block.index] = values[layer][:, cols]
                    block.key, block.parent, block.tokens = key, parent, tokens
                    self.by_key[key] = block
                    added += 1
                self._pin(block)  # the chain's own head must not be evicted for its tail
                chain.blocks.append(block)
        finally:
            self.release(chain)
        return added

    def _lookup(self, key: int, parent: int, tokens: tuple[int, ...]) -> Block | None:
        block = self.by_key.get(key)
        if block is None or block.parent != parent or block.tokens != tokens:
            return None  # absent, or a hash collision
        return block

    def _pin(self, block: Block) -> None:
        if block.refs == 0:
            self.idle.pop(block.index, None)
        block.refs += 1

    def _take(self) -> Block | None:
        """A free block, else the least recently used unpinned one, evicted; None if all pinned."""
        if not self.free and len(self.blocks) < self.num_blocks:
            try:
                self._grow()
            except torch.OutOfMemoryError:  # the budget did not fit after all: keep what there is
                log.warning("prefix cache stays at %d blocks: out of memory growing it", len(self.blocks))
                self.num_blocks = len(self.blocks)
        if self.free:
            return self.free.pop()
        if not self.idle:
            return None
        _, block = self.idle.popitem(last=False)
        del self.by_key[block.key]
        block.key, block.parent, block.tokens = None, 0, ()
        return block
