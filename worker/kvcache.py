"""A KV cache that sequences can join and leave at every decode step.

Written by hand because transformers' caches either grow a whole batch together (DynamicCache:
a new sequence cannot join, and every step re-copies the cache with torch.cat) or write at one
position shared by every row (StaticCache). Here each layer owns one preallocated buffer
[rows, kv_heads, columns, head_dim]. All rows write their next token at one shared column (the
cursor), so the model still sees an ordinary left-padded batch; each row remembers the column
where its own tokens start, and the engine masks everything left of it. A sequence that joins is
prefilled on its own and copied in right-aligned at the cursor; one that leaves is replaced by the
last row. Columns are reclaimed by shifting all rows left when the common padding grows.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """The view of one model layer onto the pool; `update` writes at the cursor in place."""

    is_sliding = False
    is_compileable = False

    def __init__(self, pool: SlotPool, layer_idx: int) -> None:
        super().__init__()
        self.pool = pool
        self.layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.pool.write(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.pool.cursor + query_length, 0

    def get_seq_length(self) -> int:
        return self.pool.cursor

    def get_max_length(self) -> int:
        return -1


class SlotPool:
    """Buffers, the shared cursor, and where each active row's tokens start."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        max_rows: int,
        max_columns: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_columns: int = 256,
    ) -> None:
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_rows = max_rows
        self.max_columns = max_columns
        self.dtype = dtype
        self.device = device
        self.columns = min(initial_columns, max_columns)
        self.keys = [self._alloc(self.columns) for _ in range(num_layers)]
        self.values = [self._alloc(self.columns) for _ in range(num_layers)]
        self.cursor = 0
        self.starts: list[int] = []
        self.cache = Cache(layers=[SlotLayer(self, i) for i in range(num_layers)])

    def _alloc(self, columns: int) -> torch.Tensor:
        shape = (self.max_rows, self.kv_heads, columns, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def rows(self) -> int:
        return len(self.starts)

    def row_length(self, row: int) -> int:
        return self.cursor - self.starts[row]

    def used_tokens(self) -> int:
        return sum(self.cursor - s for s in self.starts)

    # -- the model's side ---------------------------------------------------------------------

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        batch, q = keys.shape[0], keys.shape[2]
        end = self.cursor + q
        self.keys[layer][:batch, :, self.cursor : end] = keys
        self.values[layer][:batch, :, self.cursor : end] = values
        return self.keys[layer][:batch, :, :end], self.values[layer][:batch, :, :end]

    def advance(self, q: int = 1) -> None:
        self.cursor += q

    def decode_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [rows, 1, 1, cursor+1] for one new token per row: each row sees its own
        tokens and the new one, never the padding left of its start."""
        cols = torch.arange(self.cursor + 1, device=self.device)
        starts = torch.tensor(self.starts, device=self.device)
        hidden = cols[None, :] < starts[:, None]
        mask = torch.zeros(hidden.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(hidden, torch.finfo(dtype).min)
        return mask[:, None, None, :]

    # -- the engine's side --------------------------------------------------------------------

    def reserve(self, extra: int) -> None:
        """Makes room for `extra` more columns, reclaiming common padding before growing."""
        if self.cursor + extra <= self.columns:
            return
        self.compact()
        if self.cursor + extra > self.columns:
            self._grow(self.cursor + extra)

    def compact(self) -> None:
        """Shifts every row left by the padding they all share."""
        if not self.starts:
            self.cursor = 0
            return
        shift = min(self.starts)
        if shift == 0:
            return
        self._move_columns(src=shift, dst=0, count=self.cursor - shift)
        self.starts = [s - shift for s in self.starts]
        self.cursor -= shift

    def wasted_fraction(self) -> float:
        """Share of attended columns that are common padding (what `compact` would reclaim)."""
        if not self.starts or self.cursor == 0:
            return 0.0
        return min(self.starts) / self.cursor

    def _grow(self, needed: int) -> None:
        if needed > self.max_columns:
            raise RuntimeError(f"KV cache needs {needed} columns, more than the {self.max_columns} allowed")
        # a quarter of headroom: a prompt slightly longer than the last one must not re-copy it all
        columns = min(self.max_columns, max(needed + needed // 4, self.columns * 2))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = self._alloc(columns)
                new[:, :, : self.cursor] = old[:, :, : self.cursor]
                store[i] = new
        self.columns = columns

    def _move_columns(self, src: int, dst: int, count: int) -> None:
        rows = self.rows
        for store in (self.keys, self.values):
            for buf in store:
                buf[:rows, :, dst : dst + count] = buf[:rows, :, src : src + count].clone()

    def add_rows(self, prefill: Cache, lengths: list[int], sources: list[int]) -> list[int]:
        """Copies prefilled sequences in as new rows; `sources[i]` is the prefill batch row of
        new row i (a request with n choices appears n times). Returns the new row indices."""
        if self.rows + len(sources) > self.max_rows:
            raise RuntimeError("no free rows in the KV cache")
        longest = max(lengths[s] for s in sources)
        if longest > self.cursor:
            # Existing rows get more left padding so that the newcomer ends at the cursor.
            self.compact()
            delta = longest - self.cursor
            if longest + 1 > self.columns:
                self._grow(longest + 1)
            if self.starts and self.cursor:
                self._move_columns(src=0, dst=delta, count=self.cursor)
            self.starts = [s + delta for s in self.starts]
            self.cursor = longest
        self.reserve(1)
        padded = prefill.layers[0].keys.shape[2]
        new_rows = []
        for source in sources:
            row = self.rows
            length = lengths[source]
            start = self.cursor - length
            for layer in range(self.num_layers):
                pk, pv = prefill.layers[layer].keys, prefill.layers[layer].values
                self.keys[layer][row, :, start : self.cursor] = pk[source, :, padded - length :]
                self.values[layer][row, :, start : self.cursor] = pv[source, :, padded - length :]
            self.starts.append(start)
            new_rows.append(row)
        return new_rows

    def clear(self) -> None:
        """Forgets every row (the buffers stay allocated)."""
        self.starts = []
        self.cursor = 0

    def remove_row(self, row: int) -> int | None:
        """Frees `row` by moving the last row into it; returns the index that moved (or None)."""
        last = self.rows - 1
        moved = None
        if row != last:
            for store in (self.keys, self.values):
                for buf in store:
                    buf[row, :, : self.cursor] = buf[last, :, : self.cursor]
            self.starts[row] = self.starts[last]
            moved = last
        self.starts.pop()
        if not self.starts:
            self.cursor = 0
        return moved


class PastLayer(CacheLayerMixin):
    """One layer of a prefill that runs on top of a given past (a cached prompt prefix): the
    buffer is the batch's whole width, the past already in its first columns; `update` writes the
    new tokens after it, so the result is laid out exactly as a prefill of the whole prompts."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, past: int) -> None:
        super().__init__()
        self.keys = keys
        self.values = values
        self.length = past
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[2]
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.keys.shape[2]


def cache_over_past(num_layers: int, batch: int, kv_heads: int, width: int, head_dim: int, past: int,
                    dtype: torch.dtype, device: torch.device) -> Cache:
    """A prefill cache of `width` columns; the caller fills the first `past` columns of every row
    (zeros where the row has padding), the model the rest."""
    shape = (batch, kv_heads, width, head_dim)
    layers = [PastLayer(torch.empty(shape, dtype=dtype, device=device),
                        torch.empty(shape, dtype=dtype, device=device), past) for _ in range(num_layers)]
    return Cache(layers=layers)
