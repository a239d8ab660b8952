"""Pure admission policy for continuous batching: how many waiting requests join the next step.

Requests are admitted in arrival order (no overtaking, so no starvation) while their choices fit
in the free rows and the prompt tokens they must compute (less a prefix found in the prefix
cache) fit in the step's prefill token budget. The first waiting request is always admitted when
it fits in the rows, even if its prompt alone exceeds the budget, so that a long prompt cannot
wait forever: the engine then prefills it in chunks, one per step (chunked.py).

They must also fit in the KV budget (`KvRoom`) at their longest: in the slot cache every row takes
as many columns as the longest row, so a request is admitted only if all running rows and its own
can reach their longest possible length (prompt + max_tokens, at most the context) within the
budget. The reservation is the worst case, so a running sequence never runs out of KV and nothing
is preempted; a request that cannot fit even alone is refused (`KvRoom.never_fits`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KvRoom:
    """The KV budget in token slots, and what the running rows hold of it at their longest."""

    budget: int
    rows: int = 0
    longest: int = 0  # the longest length any running row can reach

    def admits(self, rows: int, longest: int) -> bool:
        """Whether `rows` more rows, reaching `longest` tokens at most, fit next to the running
        ones; each row takes `longest + 1` columns (the slot of the token being decoded)."""
        return (self.rows + rows) * (max(self.longest, longest) + 1) <= self.budget

    def never_fits(self, rows: int, longest: int) -> bool:
        return rows * (longest + 1) > self.budget


def plan_admission(waiting: list[tuple[int, int]], free_rows: int, token_budget: int,
                   kv: KvRoom | None = None, longest: list[int] | None = None) -> int:
    """`waiting` holds (tokens to prefill, n) in arrival order, `longest` (with `kv`) the length
    each can reach; returns how many to admit now."""
    admitted = 0
    tokens = 0
    rows = 0
    reach = 0
    for i, (prompt_tokens, n) in enumerate(waiting):
        if rows + n > free_rows:
            break
        if admitted and tokens + prompt_tokens > token_budget:
            break
        if kv is not None and longest is not None:
            if not kv.admits(rows + n, max(reach, longest[i])):
                break
            reach = max(reach, longest[i])
        admitted += 1
        tokens += prompt_tokens
        rows += n
    return admitted


def plan_prefill_groups(tails: list[int], slack: int) -> list[list[int]]:
    """Splits prefills that reuse cached prefixes into batches. A batch computes as many columns
    per row as its longest uncached tail (`tails[i]`), so rows whose tails are far apart go into
    different batches: within one, the longest tail is at most twice the shortest plus `slack`.
    Returns lists of indices into `tails`, shortest tails first."""
    groups: list[list[int]] = []
    shortest = 0
    for i in sorted(range(len(tails)), key=tails.__getitem__):
        if not groups or tails[i] > 2 * shortest + slack:
            groups.append([])
            shortest = tails[i]
        groups[-1].append(i)
    return groups
