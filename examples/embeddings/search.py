"""Semantic search over the product reviews: recall@k on labelled queries, and the top hits.

Each query in data/queries.jsonl lists the reviews that answer it (mostly one product's positive
or negative reviews, plus two queries that cut across categories). The index is the reviews'
embeddings; a query's hits are the reviews with the highest cosine. TF-IDF cosine is the keyword
baseline. Usage: `python examples/embeddings/search.py [--models A B] [--limit N] [--show 3]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import playground as pg  # the shared module beside this script
from matplotlib.figure import Figure  # no pyplot: no backend or display needed to write a PNG
from sklearn.feature_extraction.text import TfidfVectorizer

TFIDF = "tf-idf (baseline)"
KS = (5, 10, 20)


def load_queries(indexed: set[str]) -> list[dict]:
    """Queries with their relevant reviews restricted to those indexed; a query left with none is dropped."""
    queries = []
    for q in pg.load_jsonl(pg.DATA / "queries.jsonl"):
        relevant = [i for i in q["relevant"] if i in indexed]
        if relevant:
            queries.append({"query": q["query"], "relevant": relevant})
    return queries


def rank(query_vectors: np.ndarray, index_vectors: np.ndarray) -> np.ndarray:
    """Row i: indices of the index sorted by cosine to query i, best first (vectors are unit length)."""
    return np.argsort(-(query_vectors @ index_vectors.T), axis=1, kind="stable")


def recall_at(ranking: np.ndarray, ids: list[str], queries: list[dict], k: int) -> float:
    """Mean over queries of the share of the query's relevant reviews found in its top k."""
    recalls = []
    for order, q in zip(ranking, queries, strict=True):
        top = {ids[j] for j in order[:k]}
        recalls.append(len(top & set(q["relevant"])) / len(q["relevant"]))
    return float(np.mean(recalls))


def tfidf_ranking(reviews: list[dict], queries: list[dict]) -> np.ndarray:
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit([r["text"] for r in reviews])
    index = vectorizer.transform([r["text"] for r in reviews]).toarray()
    return rank(vectorizer.transform([q["query"] for q in queries]).toarray(), index)


def print_hits(name: str, ranking: np.ndarray, reviews: list[dict], queries: list[dict], show: int) -> None:
    """The top reviews per query; '+' marks a labelled relevant one."""
    print(f"\ntop {show} hits, {name}:")
    for order, q in zip(ranking, queries, strict=True):
        print(f"  {q['query']!r}")
        for j in order[:show]:
            mark = "+" if reviews[j]["id"] in q["relevant"] else " "
            print(f"    {mark} [{reviews[j]['id']}] {reviews[j]['text']}")


def plot(recalls: dict[str, dict[int, float]], chance: dict[int, float], path: Path) -> None:
    """Grouped bars of recall@k per feature set, with what random ranking would get."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    names = list(recalls)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(len(KS)) + i * width, [recalls[name][k] for k in KS], width, label=name)
    centres = np.arange(len(KS)) + width * (len(names) - 1) / 2
    ax.scatter(centres, [chance[k] for k in KS], color="black", marker="_", s=400, label="random ranking", zorder=3)
    ax.set_xticks(centres, [f"recall@{k}" for k in KS])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("semantic search over the reviews")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = pg.argument_parser(__doc__.splitlines()[0], "index at most N reviews, balanced over products")
    parser.add_argument("--show", type=int, default=3, help="top hits to print per query and model (0: none)")
    args = parser.parse_args(argv)

    reviews = pg.stratified_head(pg.load_reviews(), args.limit, lambda r: (r["product"], r["sentiment"]))
    ids = [r["id"] for r in reviews]
    queries = load_queries(set(ids))
    client = pg.make_client()
    models = pg.choose_models(client, args.models)
    print(f"{len(reviews)} reviews indexed, {len(queries)} queries; models: {', '.join(models)}")

    rankings = {TFIDF: tfidf_ranking(reviews, queries)}
    rates: dict[str, float] = {}
    for model in models:
        index = pg.embed(client, model, [r["text"] for r in reviews], args.batch_size)
        asked = pg.embed(client, model, [q["query"] for q in queries], args.batch_size)
        rates[model] = (len(reviews) + len(queries)) / (index.seconds + asked.seconds)
        rankings[model] = rank(asked.vectors, index.vectors)

    recalls = {name: {k: recall_at(r, ids, queries, k) for k in KS} for name, r in rankings.items()}
    chance = {k: min(k / len(reviews), 1.0) for k in KS}
    if args.show:
        for name, ranking in rankings.items():
            print_hits(name, ranking, reviews, queries, args.show)
    rows = [[name, *(recalls[name][k] for k in KS), rates.get(name)] for name in rankings]
    rows.append(["random ranking", *(chance[k] for k in KS), None])
    print()
    print(pg.format_table(["features", *(f"recall@{k}" for k in KS), "emb/s"], rows))

    out = pg.results_dir(args.results)
    plot(recalls, chance, out / "search.png")
    result = {"indexed": len(reviews), "queries": len(queries), "chance": chance, "embeddings_per_second": rates,
              "recall": recalls}
    pg.write_json(out / "search.json", result)
    print(f"wrote {out / 'search.png'} and {out / 'search.json'}")
    return result


if __name__ == "__main__":
    main()
