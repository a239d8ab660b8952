"""Pure admission policy for continuous batching: how many waiting requests join the next step.

Requests are admitted in arrival order (no overtaking, so no starvation) while their choices fit
in the free rows and the prompt tokens they must compute (less a prefix found in the prefix
cache) fit in the step's prefill token budget. The first waiting request is always admitted when
it fits in the rows, even if its prompt alone exceeds the budget, so that a long prompt cannot
wait forever: the engine then prefills it in chunks, one per step (chunked.py).

They must also fit in the KV budget (`KvRoom`): in the slot cache every row takes as many columns
as the longest row, so a request is admitted only if all running rows and its own fit within the
budget at the lengths planned for them: the length each holds now plus `KV_LOOKAHEAD` tokens of
decoding, at most its longest possible length (prompt + max_tokens, at most the context). Planning
for the next tokens rather than the worst case (as vLLM admits on the blocks a prompt needs)
lets a long max_tokens not hold memory it may never use; when the running rows then outgrow the
budget, the engine preempts the newest request and recomputes it later (vLLM's RECOMPUTE
preemption). A request that cannot fit even alone at its longest is refused
(`KvRoom.never_fits`), so one request always fits and preemption always ends.
"""

from __future__ import annotations

from dataclasses import dataclass

# Tokens of decoding planned for beyond a row's current length when admitting next to it: room
# for the running rows to grow a while before a newcomer would have to be preempted again.
KV_LOOKAHEAD = 32


def planned_length(current: int, longest: int) -> int:
    """The length admission plans a row for: `current` tokens now, `longest` at most."""
    return min(current + KV_LOOKAHEAD, longest)


@dataclass(frozen=True)
class KvRoom:
    """The KV budget in token slots, and the running rows with the longest length planned for any."""

    budget: int
    rows: int = 0
    longest: int = 0  # the longest planned length (planned_length) of any running row

    def admits(self, rows: int, longest: int) -> bool:
        """Whether `rows` more rows, reaching `longest` tokens at most, fit next to the running
        ones; each row takes `longest + 1` columns (the slot of the token being decoded)."""
        return (self.rows + rows) * (max(self.longest, longest) + 1) <= self.budget

    def never_fits(self, rows: int, longest: int) -> bool:
        return rows * (longest + 1) > self.budget


def plan_admission(waiting: list[tuple[int, int]], free_rows: int, token_budget: int,
                   kv: KvRoom | None = None, longest: list[int] | None = None) -> int:
    """`waiting` holds (tokens to prefill, n) in arrival order, `longest` (with `kv`) the length
    planned for each (planned_length); returns how many to admit now."""
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
