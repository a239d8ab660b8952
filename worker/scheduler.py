"""Pure admission policy for continuous batching: how many waiting requests join the next step.

Requests are admitted in arrival order (no overtaking, so no starvation) while their choices fit
in the free rows and their prompts fit in the step's prefill token budget. The first waiting
request is always admitted when it fits in the rows, even if its prompt alone exceeds the budget,
so that a long prompt cannot wait forever.
"""

from __future__ import annotations


def plan_admission(waiting: list[tuple[int, int]], free_rows: int, token_budget: int) -> int:
    """`waiting` holds (prompt_tokens, n) in arrival order; returns how many to admit now."""
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
