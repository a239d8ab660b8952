"""A KV cache that sequences can join and leave at every decode step.

Written by hand because transformers' caches either grow a whole batch together (DynamicCache:
a new sequence cannot join, and every step re-copies the cache with torch.cat) or write at one
position shared by every row (StaticCache). Here each layer owns one preallocated buffer
[rows, kv_heads, columns, head_dim]. All rows write their next token at one shared column (the
cursor), so the model still sees an ordinary left-padded batch; each row remembers the column
where its own tokens start, and the engine masks everything left of it. A sequence that joins is
prefilled on its own and copied in right-aligned at the cursor (on top of a cached prompt prefix,
prefilled in place in its new row: `open_rows`, `prefill_cache`); one that leaves is replaced by
the last row. Columns are reclaimed by shifting all rows left when the common padding grows.

Memory: the buffers grow in both rows and columns as sequences need them, and never past a
budget of `budget_tokens` token slots (rows x columns, per layer, keys and values), which the
engine sizes from `--kv-cache-memory`. A row costs as many columns as the longest row, so the
engine admits a sequence only when every running row, and it, fit at the lengths planned for
their next tokens (scheduler.KvRoom), and before the rows outgrow the budget it preempts the
newest request (engine._make_kv_room); an allocation past the budget is a bug, not an
out-of-memory crash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .allocator import lazy_zeros


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
        return self.pool.attended_columns(query_length), 0

    def get_seq_length(self) -> int:
        return self.pool.cursor

    def get_max_length(self) -> int:
        return -1


FULL_WIDTH_MARGIN = 32  # columns of headroom at least, when decode reads whole rows
# Bytes a grouped row's column costs against a whole row's (SlotPool.decode_groups): the copy
# reads and writes it, and the matmuls read the copy.
GROUP_COPY_COST = 3


@dataclass(frozen=True)
class RowGroup:
    """Rows of a decode step whose attention reads columns `start` to `end` only, and where their
    keys and values are copied for it (each layer in turn: the pool's buffers, reused)."""

    rows: torch.Tensor  # row indices into the batch
    start: int
    end: int
    keys: torch.Tensor  # [len(rows), kv_heads, end - start, head_dim]
    values: torch.Tensor


@dataclass(frozen=True)
class SharedPrefix:
    """A step whose rows all begin with the same `length` tokens of KV (copied from one
    prefix-cache chain): one copy of it, in row `row` from column `start` of the keys the
    attention is given, and each row's own columns after it, in the window from `own_start` to
    the step's last column, with `own_mask` [rows, 1, queries, window] hiding what a row's query
    must not see there (its prefix, its padding, later columns). A decode step has one query per
    row, a prefill the rows' new tokens (`shared_layout`)."""

    row: int
    start: int
    length: int
    own_start: int
    own_mask: torch.Tensor


def shared_layout(starts: list[int], end: int, queries: int, length: int, dtype: torch.dtype,
                  device: torch.device) -> SharedPrefix:
    """The SharedPrefix of rows whose tokens begin at columns `starts` and end at `end` (exclusive),
    the last `queries` of them the step's queries, all beginning with the same `length` tokens:
    the first row's copy of those, and a causal mask over the window of the rows' own columns."""
    own_start = min(starts) + length
    columns = torch.arange(own_start, end, device=device)
    firsts = torch.tensor(starts, device=device)[:, None, None] + length  # [rows, 1, 1]: a row's own first column
    asked = torch.arange(end - queries, end, device=device)[None, :, None]  # [1, queries, 1]: the query's column
    hidden = (columns[None, None, :] < firsts) | (columns[None, None, :] > asked)
    mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, torch.finfo(dtype).min)
    return SharedPrefix(0, starts[0], length, own_start, mask[:, None])


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
        budget_tokens: int | None = None,
        initial_rows: int = 8,
        full_width: bool = False,
    ) -> None:
        self.num_layers = num_layers
        # decode attends to every allocated column of its rows, not just up to the cursor: the
        # view of whole rows is dense, which `decode_attention`'s matmuls need not to copy the KV
        self.full_width = full_width
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_rows = max_rows
        self.max_columns = max_columns
        self.dtype = dtype
        self.device = device
        self.budget_tokens = budget_tokens if budget_tokens is not None else max_rows * max_columns
        self.row_capacity = max(1, min(initial_rows, max_rows, self.budget_tokens))
        if full_width:  # every allocated column is read at every step: start narrow
            initial_columns = min(initial_columns, FULL_WIDTH_MARGIN * 2)
        self.columns = max(1, min(initial_columns, max_columns, self.budget_tokens // self.row_capacity))
        self.keys = [self._alloc(self.row_capacity, self.columns) for _ in range(num_layers)]
        self.values = [self._alloc(self.row_capacity, self.columns) for _ in range(num_layers)]
        self.cursor = 0
        self.starts: list[int] = []
        self.cache = Cache(layers=[SlotLayer(self, i) for i in range(num_layers)])
        self._copies: list[torch.Tensor] = []  # decode groups' K/V copies (decode_groups)
        self._spares: list[torch.Tensor] = []  # the buffers the last shrink replaced (_reallocate)

    def _alloc(self, rows: int, columns: int, spares: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Zeroed (padding is masked, but must be finite): in one of `spares` large enough, taken
        from the list, else in fresh pages taken as rows fill them."""
        shape = (rows, self.kv_heads, columns, self.head_dim)
        numel = rows * self.kv_heads * columns * self.head_dim
        for i, spare in enumerate(spares or ()):
            if spare.numel() >= numel:
                del spares[i]
                return spare.view(-1)[:numel].zero_().view(shape)
        return lazy_zeros(shape, self.dtype, self.device)

    @property
    def rows(self) -> int:
        return len(self.starts)

    def row_length(self, row: int) -> int:
        return self.cursor - self.starts[row]

    def used_tokens(self) -> int:
        """Token slots that hold a running sequence's KV (what vLLM's usage gauge counts)."""
        return sum(self.cursor - s for s in self.starts)

    def allocated_tokens(self) -> int:
        """Token slots the buffers take, padding included: at most `budget_tokens`."""
        return self.row_capacity * self.columns

    # -- the model's side ---------------------------------------------------------------------

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        batch, q = keys.shape[0], keys.shape[2]
        end = self.cursor + q
        self.keys[layer][:batch, :, self.cursor : end] = keys
        self.values[layer][:batch, :, self.cursor : end] = values
        width = self.attended_columns(q)
        return self.keys[layer][:batch, :, :width], self.values[layer][:batch, :, :width]

    def attended_columns(self, q: int) -> int:
        """The columns a step of `q` new tokens per row attends to (and its mask covers)."""
        return self.columns if self.full_width else self.cursor + q

    def decode_groups(self) -> list[RowGroup] | None:
        """How a decode step's attention should read the rows, when their lengths differ enough
        to matter: None to read every row whole (`decode_attention` over the pool's dense view),
        else two groups, the longest rows and the rest, each over only the columns its own rows
        need. Every row ends at the cursor, so one long conversation among short ones would
        otherwise have every row read (and mask) the long one's width: at 32 rows over 1,600
        columns, of which 31 rows use 64, a layer's attention took 6 ms whole and 0.6 ms grouped.
        A group's rows and columns are copied out first (a dense view is what oneDNN's matmul
        reads without copying), so grouping is chosen only where it reads under half the bytes,
        counting the copy. What vLLM's paged attention gets from block tables, for the common
        case of a few long rows beside many short ones. Call after `ready_for_decode`."""
        rows = self.rows
        if rows < 2:
            return None
        end = self.cursor + 1  # the step's own column included
        order = sorted(range(rows), key=self.starts.__getitem__)  # longest first
        lengths = [end - self.starts[r] for r in order]
        whole, best, split = rows * self.attended_columns(1), None, 0
        for k in range(1, rows):
            cost = GROUP_COPY_COST * (k * lengths[0] + (rows - k) * lengths[k])
            if best is None or cost < best:
                best, split = cost, k
        if best is None or 2 * best > whole:
            return None
        groups = []
        for i, (members, length) in enumerate(((order[:split], lengths[0]), (order[split:], lengths[split]))):
            shape = (len(members), self.kv_heads, length, self.head_dim)
            groups.append(RowGroup(torch.tensor(members, device=self.device), end - length, end,
                                   self._copy_space(2 * i, shape), self._copy_space(2 * i + 1, shape)))
        return groups

    def shared_prefix(self, length: int, dtype: torch.dtype) -> SharedPrefix:
        """The layout of a decode step whose rows all begin with the same `length` tokens (the
        caller knows they do). Call after `ready_for_decode`."""
        return shared_layout(self.starts, self.cursor + 1, 1, length, dtype, self.device)

    def _copy_space(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A buffer of `shape` that decode groups copy K or V into, kept between steps: a fresh
        multi-megabyte tensor at every layer of every step cost more in page faults than the
        copy itself (1 to 2 ms against 0.1 to 0.3 for 4 rows of 1,500 columns). At most a sixth
        of a layer's KV each, since groups are chosen only when they read that little."""
        numel = 1
        for size in shape:
            numel *= size
        while len(self._copies) <= slot:
            self._copies.append(torch.empty(0, dtype=self.dtype, device=self.device))
        if self._copies[slot].numel() < numel:
            self._copies[slot] = torch.empty(numel + numel // 4, dtype=self.dtype, device=self.device)
        return self._copies[slot][:numel].view(shape)

    def advance(self, q: int = 1) -> None:
        self.cursor += q

    def decode_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [rows, 1, 1, attended columns] for one new token per row: each row sees
        its own tokens and the new one, never the padding left of its start nor (`full_width`)
        the columns right of the new token."""
        cols = torch.arange(self.attended_columns(1), device=self.device)
        starts = torch.tensor(self.starts, device=self.device)
        hidden = (cols[None, :] < starts[:, None]) | (cols[None, :] > self.cursor)
        mask = torch.zeros(hidden.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(hidden, torch.finfo(dtype).min)
        return mask[:, None, None, :]

    # -- the engine's side --------------------------------------------------------------------

    def ready_for_decode(self) -> None:
        """Before a decode step: reclaims the rows' common padding once it is over half of what
        they attend to, gives back columns the rows no longer need (`full_width`), and makes room
        for the step's column."""
        if self.cursor > 64 and self.wasted_fraction() > 0.5:
            self.compact()
        self._shrink(1)
        self.reserve(1)

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

    def _grow(self, needed: int, rows: int | None = None) -> None:
        """Reallocates for at least `needed` columns and `rows` rows (default: as many as now),
        with headroom where the budget allows it; the rows' KV is copied over."""
        rows = max(rows or 0, self.rows, 1)
        if needed > self.max_columns:
            raise RuntimeError(f"KV cache needs {needed} columns, more than the {self.max_columns} allowed")
        if rows * needed > self.budget_tokens:
            raise RuntimeError(f"KV cache needs {rows} rows of {needed} columns, more than its budget of "
                               f"{self.budget_tokens} tokens (admission should have waited)")
        # headroom: a prompt slightly longer than the last one must not re-copy it all; but with
        # `full_width` every step reads the headroom too
        columns = max(needed, self.columns)
        if needed > self.columns and self.full_width:
            columns = min(self.max_columns, self._full_width_columns(needed))
        elif needed > self.columns:
            columns = min(self.max_columns, max(needed + needed // 4, self.columns * 2))
        capacity = max(rows, self.row_capacity)
        if rows > self.row_capacity:
            capacity = min(self.max_rows, max(rows, self.row_capacity * 2))
        columns = max(needed, min(columns, self.budget_tokens // capacity))
        if capacity * columns > self.budget_tokens:  # rows held for sequences that have left
            capacity = max(rows, self.budget_tokens // columns)
        self._reallocate(capacity, columns)

    def _shrink(self, extra: int) -> None:
        """With `full_width` every decode step reads every allocated column, so the columns a burst
        of long prompts left behind would slow every later step: after 32 prompts of ~1,500
        tokens, 32-row steps of short requests ran at 0.43x over 1,700 columns they no longer
        needed. Once the rows (and `extra` more columns) take under a quarter of what growing
        would allocate for them, the buffers shrink to that, compacted first; the quarter keeps
        a row that comes and goes from copying the KV back and forth. Without `full_width` a
        step reads only up to the cursor, and the columns cost no time."""
        if not self.full_width or self.columns <= 2 * FULL_WIDTH_MARGIN:
            return
        span = self.cursor - min(self.starts, default=self.cursor)  # the cursor once compacted
        if 4 * self._full_width_columns(span + extra) > self.columns:
            return
        self.compact()
        self._reallocate(self.row_capacity, max(2 * FULL_WIDTH_MARGIN, self._full_width_columns(self.cursor + extra)))

    @staticmethod
    def _full_width_columns(needed: int) -> int:
        """Columns to allocate for `needed` under `full_width`: a margin of an eighth (a copy of
        all the KV every ~needed/8 steps costs less than reading a wider margin at each of them)."""
        return needed + max(FULL_WIDTH_MARGIN, needed // 8)

    def _reallocate(self, capacity: int, columns: int) -> None:
        """New buffers of `capacity` rows and `columns` columns, the rows' KV copied over. The
        buffers a shrink replaces are kept, and the next growth is laid out in them: a burst of
        long prompts after short requests wrote 750 MB of freshly mapped pages otherwise, 1 to
        7 s of its admission in this VM (first touches at 0.25-1 GB/s), where zeroing pages
        already held takes a tenth of that. A growth drops the spares it did not use; the memory
        held is at most the largest buffers' since the last growth, within the budget."""
        shrinking = capacity * columns < self.row_capacity * self.columns
        spares, self._spares = ([], []) if shrinking else (self._spares, [])
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = self._alloc(capacity, columns, spares)
                new[: self.rows, :, : self.cursor] = old[: self.rows, :, : self.cursor]
                store[i] = new
                if shrinking:
                    self._spares.append(old)
        self.columns, self.row_capacity = columns, capacity
        self._copies = []  # sized for the old buffers: made again as groups need them

    def _move_columns(self, src: int, dst: int, count: int) -> None:
        rows = self.rows
        for store in (self.keys, self.values):
            for buf in store:
                buf[:rows, :, dst : dst + count] = buf[:rows, :, src : src + count].clone()

    def add_rows(self, prefill: Cache, lengths: list[int], sources: list[int]) -> list[int]:
        """Copies prefilled sequences in as new rows; `sources[i]` is the prefill batch row of
        new row i (a request with n choices appears n times). Returns the new row indices."""
        self._make_room([lengths[s] for s in sources])
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

    def open_rows(self, lengths: list[int]) -> list[int]:
        """New rows for sequences of `lengths` tokens, right-aligned at the cursor as `add_rows`
        lays them out, their columns left for a prefill to write in place (`prefill_cache`).
        Returns the new row indices."""
        self._make_room(lengths)
        new_rows = list(range(self.rows, self.rows + len(lengths)))
        self.starts += [self.cursor - n for n in lengths]
        return new_rows

    def prefill_cache(self, first_row: int, rows: int, width: int, past: int) -> Cache:
        """A prefill cache over the pool's own rows `first_row` onwards: the last `width` columns
        before the cursor, whose first `past` the caller fills with the cached past (PastLayer).
        The prefill writes its KV straight into the rows and attends to it there, so nothing is
        copied in after it."""
        span, cols = slice(first_row, first_row + rows), slice(self.cursor - width, self.cursor)
        return Cache(layers=[PastLayer(self.keys[i][span, :, cols], self.values[i][span, :, cols], past)
                             for i in range(self.num_layers)])

    def _make_room(self, lengths: list[int]) -> None:
        """Room for new rows of `lengths` tokens ending at the cursor, and one more column."""
        if self.rows + len(lengths) > self.max_rows:
            raise RuntimeError("no free rows in the KV cache")
        longest = max(lengths)
        if self.rows + len(lengths) > self.row_capacity:
            self.compact()
            self._grow(max(longest, self.cursor) + 1, rows=self.rows + len(lengths))
        if longest > self.cursor:
            # Existing rows get more left padding so that the newcomer ends at the cursor.
            self.compact()
            delta = longest - self.cursor
            if longest + 1 > self.columns:
                self._grow(longest + 1, rows=self.rows + len(lengths))
            if self.starts and self.cursor:
                self._move_columns(src=0, dst=delta, count=self.cursor)
            self.starts = [s + delta for s in self.starts]
            self.cursor = longest
        self.reserve(1)

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


SLOT_ATTENTION = "modelfleet_slots"


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs):
    """The engine's attention for a bfloat16 model on CPU: a decode step (one query per row) as
    batched matmuls (`decode_attention`), everything else transformers' SDPA.

    PyTorch's CPU SDPA kernel is slow on one bfloat16 query per row: one thread, 32 rows of 8 heads
    of 64, a layer's call took 2.3 ms over 76 columns and 48 ms over 1,600, against 0.4 and 7.1 ms
    for the matmuls, and 1.3 and 14 ms for SDPA on float32 KV (what the pool kept before: twice the
    bytes). A prefill stays on SDPA: there bfloat16 is as fast as float32 (22.3 against 22.9 ms for
    1,024 causal tokens, 2.5 against 2.9 ms for 64 tokens on a 1,024-token cached prefix).
    Sliding windows, logit softcapping and attention sinks are SDPA's (or refused by it): the
    engine does not select this attention for a model that has them (`decodes_by_matmul`)."""
    if kwargs.get("shared_prefix") is not None:  # rows on one cached prefix (engine._prefill_shared_prefix)
        return shared_prefix_attention(query, key, value, kwargs["shared_prefix"], kwargs.get("scaling")), None
    if query.shape[2] == 1 and key.device.type == "cpu" and not any(
            kwargs.get(name) is not None for name in ("sliding_window", "softcap", "s_aux")):
        return decode_attention(query, key, value, attention_mask, kwargs.get("scaling")), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None = None, groups: list[RowGroup] | None = None,
                     shared: SharedPrefix | None = None) -> torch.Tensor:
    """Attention of one query per row, `query` [rows, heads, 1, D] over `key`/`value` [rows,
    kv_heads, columns, D], with an additive `mask` [rows, 1, 1, columns]; returns [rows, 1, heads,
    D], as transformers' attention functions do. The math of transformers' `eager_attention_forward`:
    products in the KV's dtype, softmax in float32 (scale and mask added in float32 too).

    The query heads that share a KV head are one matrix's rows ([rows, kv_heads, group, D], as
    transformers' `pack_gqa` lays them out for SDPA), so grouped-query attention reads each K/V
    once, with no `repeat_kv` copy. oneDNN's batched matmul copies any operand that is not dense,
    so the pool hands over whole rows (`SlotPool.full_width`): the columns right of the cursor are
    masked, which costs their bytes but not a copy of everything. With `groups`
    (SlotPool.decode_groups), each group's rows attend over its own columns only, copied out
    dense: the columns left out are masked for them, so each row's result is the same. With
    `shared` (SlotPool.shared_prefix), see `shared_prefix_attention`."""
    if shared is not None:
        return shared_prefix_attention(query, key, value, shared, scaling)
    if groups is None:
        return _attend(query, key, value, mask, scaling)
    rows, heads, _, dim = query.shape
    out = query.new_empty((rows, 1, heads, dim))
    for g in groups:
        width = g.end - g.start
        keys = torch.index_select(key.narrow(2, g.start, width), 0, g.rows, out=g.keys)
        values = torch.index_select(value.narrow(2, g.start, width), 0, g.rows, out=g.values)
        masked = None if mask is None else mask.narrow(3, g.start, width).index_select(0, g.rows)
        out.index_copy_(0, g.rows, _attend(query.index_select(0, g.rows), keys, values, masked, scaling))
    return out


# The float32 scores of cascade attention's prefix part are computed a few KV heads at a time, to
# at most this many bytes: a prefill's 32 x 20 queries over a 1,500-token prefix make 30 MB a
# layer, and such a temporary, freed and allocated again at every layer, took page faults that
# doubled the attention's time here (50 against 16 to 20 ms a layer, one head at a time). The
# worker's malloc settings (allocator.py) keep such blocks too, but not where the process's owner
# chose another allocator, nor in-process users of the engine; and smaller scores stay in cache.
SCORES_CHUNK_BYTES = 4 << 20


def shared_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shared: SharedPrefix,
                            scaling: float | None) -> torch.Tensor:
    """Attention of rows that all begin with the same prefix (cascade attention, as FlashInfer and
    vLLM do it on GPUs): `query` [rows, heads, queries, D] over `key`/`value` [rows, kv_heads,
    columns, D]; returns [rows, queries, heads, D], as transformers' attention functions do.

    Every row's queries, stacked as one matrix, read a single copy of the prefix's K and V; each
    row reads its own columns after it (`shared.own_mask`); the two softmaxes are joined by their
    log-sum-exps, so each row's result is that of attending to its whole row. The products are in
    the KV's dtype, the softmax in float32, as in `_attend`. Measured here, one thread: a decode
    step of 32 rows on a 1,500-token system prompt, every row reading its own copy, took 6.1 ms a
    layer, this about 2 ms; the prefill of 32 questions of 20 tokens on it, 38 ms a layer in
    PyTorch's SDPA, 16 to 20 here. PyTorch's own flash kernel, fed the stacked queries, took 25."""
    rows, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    per_kv = heads // kv_heads * queries  # the queries that read one KV head, per row
    scale = dim**-0.5 if scaling is None else scaling
    length, own_end = shared.length, shared.own_start + shared.own_mask.shape[-1]
    grouped = query.reshape(rows, kv_heads, per_kv, dim)
    stacked = grouped.transpose(0, 1).reshape(kv_heads, rows * per_kv, dim)
    prefix_k = key[shared.row, :, shared.start : shared.start + length]  # [kv_heads, length, D]
    prefix_v = value[shared.row, :, shared.start : shared.start + length]
    heads_at_once = max(1, SCORES_CHUNK_BYTES // (4 * rows * per_kv * length))
    parts = [_partial_attention(stacked[h : h + heads_at_once], prefix_k[h : h + heads_at_once],
                                prefix_v[h : h + heads_at_once], scale) for h in range(0, kv_heads, heads_at_once)]
    prefix = parts[0] if len(parts) == 1 else [torch.cat(p) for p in zip(*parts, strict=True)]
    on_prefix, prefix_lse = (t.view(kv_heads, rows, per_kv, -1).transpose(0, 1) for t in prefix)
    on_own, own_lse = _partial_attention(grouped, key[:, :, shared.own_start : own_end],
                                         value[:, :, shared.own_start : own_end], scale, shared.own_mask)
    total = torch.logaddexp(prefix_lse, own_lse)
    out = on_prefix.mul_(prefix_lse.sub_(total).exp_()).add_(on_own.mul_(own_lse.sub_(total).exp_()))
    return out.to(value.dtype).reshape(rows, heads, queries, dim).transpose(1, 2)


def _partial_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of `query` [..., Q, D] over `key`/`value` [..., K, D] alone: the float32
    result and each query's log-sum-exp of its scores [..., Q, 1], which is what joining it with
    attention over other columns needs. `mask` [rows, 1, q, K] is added to the scores of every
    query head that shares a KV head (Q = heads per KV head x q)."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        scores.view(*scores.shape[:2], -1, *mask.shape[-2:]).add_(mask.unsqueeze(2))
    top = scores.amax(-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    total = weights.sum(-1, keepdim=True)
    out = torch.matmul(weights.to(value.dtype), value).float().div_(total)
    return out, top.add_(total.log_())


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            scaling: float | None) -> torch.Tensor:
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)).float()
    scores.mul_(dim**-0.5 if scaling is None else scaling)
    if mask is not None:
        scores.add_(mask)
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(weights, value).reshape(rows, 1, heads, dim)


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)


def decodes_by_matmul(config, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the engine runs a model under `slot_attention`: bfloat16 on CPU, and none of the
    attention variants the matmuls leave out (a sliding window, logit softcapping, sinks)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    layer_types = getattr(config, "layer_types", None) or ()
    return (getattr(config, "sliding_window", None) is None
            and all(t == "full_attention" for t in layer_types)
            and getattr(config, "attn_logit_softcapping", None) is None
            and getattr(config, "model_type", None) != "gpt_oss")  # sinks: a learned logit per head


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


DEFAULT_KV_FRACTION = 0.4  # of the memory free at start-up, for `--kv-cache-memory` left unset
DEFAULT_KV_CAP = 32 << 30


def default_kv_cache_bytes(device: torch.device) -> int:
    """The KV budget when none is given: 40% of the memory free at start-up (the device's on
    CUDA; on CPU MemAvailable of /proc/meminfo, or the cgroup limit less usage when that is
    less), at most 32 GiB. A bound, not a reservation: the
    cache takes memory as sequences need it, and the engine caps the budget at what
    max_num_seqs x max_model_len can use."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _available_memory()
    return int(min(free * DEFAULT_KV_FRACTION, DEFAULT_KV_CAP))


def _available_memory() -> int:
    """The host's available memory, or what the cgroup limit leaves, whichever is less: in a pod,
    /proc/meminfo describes the node, and memory past the limit is an OOM kill."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free pages: an underestimate
    room = _cgroup_room()
    return free if room is None else min(free, room)


def _cgroup_room() -> int | None:
    """The cgroup's memory limit less its usage (cgroup v2, else v1); None without a limit."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
            return None
        return max(0, int(limit) - usage)
    return None
