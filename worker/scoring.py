"""Score and rerank, without the model: pairing the texts, cosine of embeddings, ranking, and
the answers in vLLM's shapes (`ScoreResponse`, `RerankResponse` of its pooling entrypoints).

The request's shape (empty sides, 1:1, 1:N or N:N, at most 2048 texts) is checked by the
protocol models, which the gateway also uses for replicas of another engine; what is here
assumes a valid request.
"""

from __future__ import annotations

from typing import Any

import torch

from modelfleet.openai_types import (
    PoolingUsage,
    Rerank,
    RerankDocument,
    RerankResult,
    ScoreData,
    ScoreList,
    Usage,
)
from modelfleet.protocol import new_id, now


def pairs(first: list[str], second: list[str]) -> list[tuple[str, str]]:
    """vLLM's pairing: one first text goes with every second text (1:N), else they pair up."""
    if len(first) == 1:
        return [(first[0], text) for text in second]
    return list(zip(first, second, strict=True))


def cosine_scores(first: list[torch.Tensor], second: list[torch.Tensor]) -> list[float]:
    """A bi-encoder's score of each pair, as vLLM computes it: the cosine of the two embeddings
    (computed, not assumed: not every embedding model normalises its output)."""
    a = torch.stack(first).float()
    b = torch.stack(second).float()
    if a.shape[0] == 1:
        a = a.expand_as(b)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()


def rank(scores: list[float], documents: list[str], top_n: int | None,
         return_documents: bool | None = True) -> list[dict[str, Any]]:
    """Results by falling score (a stable sort: ties keep the documents' order), cut to `top_n`
    unless it is 0 or absent, each with its document unless told not to."""
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if top_n:
        order = order[:top_n]
    results = []
    for i in order:
        result = RerankResult(index=i, relevance_score=scores[i])
        if return_documents is not False:
            result.document = RerankDocument(text=documents[i])
        results.append(result.dump())
    return results


def rerank_response(model: str, scores: list[float], documents: list[str], top_n: int | None,
                    return_documents: bool | None, tokens: int) -> dict[str, Any]:
    return Rerank(id=new_id("rerank"), model=model, usage=PoolingUsage(prompt_tokens=tokens, total_tokens=tokens),
                  results=rank(scores, documents, top_n, return_documents)).dump()


def score_response(model: str, scores: list[float], tokens: int) -> dict[str, Any]:
    return ScoreList(id=new_id("score"), created=now(), model=model,
                     data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
                     usage=Usage.of(tokens, 0)).dump()
