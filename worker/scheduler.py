"""Pure admission policy for continuous batching: how many waiting requests join the next step.

Requests are admitted in arrival order (no overtaking, so no starvation) while their choices fit
in the free rows and the prompt tokens they must compute (less a prefix found in the prefix
cache) fit in the step's prefill token budget. The first waiting request is always admitted when
it fits in the rows, even if its prompt alone exceeds the budget, so that a long prompt cannot
wait forever.
"""

from __future__ import annotations


def plan_admission(waiting: list[tuple[int, int]], free_rows: int, token_budget: int) -> int:
    """`waiting` holds (tokens to prefill, n) in arrival order; returns how many to admit now."""
    admitted = 0
    tokens = 0
    rows = 0
    for prompt_tokens, n in waiting:
        if rows + n > free_rows:
            break
        if admitted and tokens + prompt_tokens > token_budget:
            break
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
