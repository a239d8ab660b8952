"""Retrieve, then rerank: similarity search picks candidates, /v1/rerank reorders them.

The first stage is search.py's: the reviews' embeddings from one embedding model (`--retriever`),
a query's candidates the `--candidates` reviews of highest cosine. Each reranker (`--models`;
by default every model that /v1/models lists with `capabilities.score`) then reorders each
query's candidates through /v1/rerank. Reranking moves no new review into the candidates, so
the measures are those of order: recall@5 and @10 and the mean reciprocal rank of the first
relevant review, before and after. A cross-encoder, which reads query and review together, is
what is expected to gain; an embedding model used as its own reranker scores by the same cosine
and must give back the similarity order, which makes it the control.
Usage: `python examples/embeddings/rerank.py [--retriever M] [--models A B] [--candidates 20]`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx
import numpy as np
import playground as pg  # the shared modules beside this script
import search

KS = (5, 10)


def score_models(client) -> list[str]:
    """Models the server says can score (modelfleet's `capabilities.score`): cross-encoders and
    embedding models."""
    return [m.id for m in client.models.list() if ((m.model_extra or {}).get("capabilities") or {}).get("score")]


def default_retriever(client) -> str:
    """The first embedding model proper (task `embed`), else the first model that embeds."""
    cards = list(client.models.list())
    for card in cards:
        extra = card.model_extra or {}
        if extra.get("task") == "embed":
            return card.id
    models = pg.embedding_models(client)
    if not models:
        raise SystemExit("the server lists no embedding model; name one with --retriever")
    return models[0]


def rerank(client, model: str, query: str, documents: list[str]) -> list[int]:
    """The documents' indices, best first, as /v1/rerank orders them (the openai SDK has no rerank
    method, so this is a plain POST with the same base URL and key)."""
    r = httpx.post(f"{str(client.base_url).rstrip('/')}/rerank", timeout=120,
                   headers={"authorization": f"Bearer {client.api_key}"},
                   json={"model": model, "query": query, "documents": documents, "return_documents": False})
    if r.status_code != 200:
        raise SystemExit(f"/v1/rerank with {model} answered {r.status_code}: {r.text[:500]}")
    return [result["index"] for result in r.json()["results"]]


def measures(orders: list[list[str]], queries: list[dict]) -> dict[str, float]:
    """recall@k for KS and the mean reciprocal rank of the first relevant review (0 if none)."""
    out = {f"recall@{k}": float(np.mean([len(set(o[:k]) & set(q["relevant"])) / len(q["relevant"])
                                        for o, q in zip(orders, queries, strict=True)])) for k in KS}
    reciprocal = []
    for order, q in zip(orders, queries, strict=True):
        ranks = [i for i, doc in enumerate(order) if doc in q["relevant"]]
        reciprocal.append(1 / (ranks[0] + 1) if ranks else 0.0)
    out["mrr"] = float(np.mean(reciprocal))
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = pg.argument_parser(__doc__.splitlines()[0], "index at most N reviews, balanced over products")
    parser.add_argument("--retriever", metavar="NAME", help="embedding model of the first stage")
    parser.add_argument("--candidates", type=int, default=20, help="reviews retrieved per query, then reranked")
    args = parser.parse_args(argv)  # --models: the rerankers (default: every model listed as able to score)

    reviews = pg.stratified_head(pg.load_reviews(), args.limit, lambda r: (r["product"], r["sentiment"]))
    ids = [r["id"] for r in reviews]
    queries = search.load_queries(set(ids))
    client = pg.make_client()
    retriever = args.retriever or default_retriever(client)
    rerankers = list(args.models or score_models(client))
    if not rerankers:
        raise SystemExit("the server lists no model that can score; name one with --models")
    print(f"{len(reviews)} reviews indexed, {len(queries)} queries, {args.candidates} candidates each; "
          f"retriever: {retriever}; rerankers: {', '.join(rerankers)}")

    index = pg.embed(client, retriever, [r["text"] for r in reviews], args.batch_size)
    asked = pg.embed(client, retriever, [q["query"] for q in queries], args.batch_size)
    candidates = [[ids[j] for j in order[: args.candidates]] for order in search.rank(asked.vectors, index.vectors)]
    text = {r["id"]: r["text"] for r in reviews}
    results = {f"similarity ({retriever})": measures(candidates, queries)}
    seconds: dict[str, float] = {}
    for model in rerankers:
        started = time.perf_counter()
        orders = [[cands[i] for i in rerank(client, model, q["query"], [text[c] for c in cands])]
                  for q, cands in zip(queries, candidates, strict=True)]
        seconds[model] = (time.perf_counter() - started) / len(queries)
        results[f"reranked by {model}"] = measures(orders, queries)

    base = results[f"similarity ({retriever})"]["mrr"]
    rows = [[name, *m.values(), m["mrr"] - base, seconds.get(name.removeprefix("reranked by "))]
            for name, m in results.items()]
    print()
    print(pg.format_table(["ranking", *(f"recall@{k}" for k in KS), "MRR", "MRR gain", "s/query"], rows))
    out = pg.results_dir(args.results)
    result = {"indexed": len(reviews), "queries": len(queries), "candidates": args.candidates, "retriever": retriever,
              "measures": results, "seconds_per_query": seconds}
    pg.write_json(out / "rerank.json", result)
    print(f"wrote {out / 'rerank.json'}")
    return result


if __name__ == "__main__":
    main()
