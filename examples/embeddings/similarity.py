"""How well each model's cosine similarity ranks sentence pairs the way a person scored them.

The pairs (data/sentence_pairs.jsonl) carry 0-5 scores in the STS convention; the measure is the
Spearman rank correlation between cosine similarity and those scores, since a model need only
order pairs correctly, not reproduce the scale. TF-IDF cosine is the word-overlap baseline; some
pairs share words but not meaning ("river bank" / "bank loan") to tell the two apart.
Usage: `python examples/embeddings/similarity.py [--models A B] [--limit N]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import playground as pg  # the shared module beside this script
from matplotlib.figure import Figure  # no pyplot: no backend or display needed to write a PNG
from scipy.stats import pearsonr, spearmanr
from sklearn.feature_extraction.text import TfidfVectorizer

TFIDF = "tf-idf (baseline)"


def load_pairs(limit: int | None) -> list[dict]:
    """The scored pairs; a reduced run takes N spread evenly over the score range."""
    pairs = sorted(pg.load_jsonl(pg.DATA / "sentence_pairs.jsonl"), key=lambda p: p["score"])
    if limit is None or limit >= len(pairs):
        return pairs
    return [pairs[i] for i in np.linspace(0, len(pairs) - 1, limit).round().astype(int)]


def pair_cosines(vectors: dict[str, np.ndarray], pairs: list[dict]) -> np.ndarray:
    """Cosine of each pair from unit vectors keyed by sentence."""
    return np.array([float(vectors[p["sentence1"]] @ vectors[p["sentence2"]]) for p in pairs])


def tfidf_cosines(pairs: list[dict]) -> np.ndarray:
    """Cosine of TF-IDF vectors fitted on all the sentences: what shared words alone give."""
    sentences = unique_sentences(pairs)
    matrix = TfidfVectorizer().fit_transform(sentences).toarray()  # rows are L2-normalised
    return pair_cosines(dict(zip(sentences, matrix, strict=True)), pairs)


def unique_sentences(pairs: list[dict]) -> list[str]:
    """Each sentence once, so a sentence shared by two pairs is embedded once."""
    return list(dict.fromkeys(s for p in pairs for s in (p["sentence1"], p["sentence2"])))


def correlations(cosines: np.ndarray, human: np.ndarray) -> dict[str, float]:
    return {"spearman": float(spearmanr(cosines, human).statistic), "pearson": float(pearsonr(cosines, human)[0])}


def plot(cosines: dict[str, np.ndarray], human: np.ndarray, stats: dict[str, dict[str, float]], path: Path) -> None:
    """One scatter per feature set: human score against cosine, Spearman's rho in the title."""
    fig = Figure(figsize=(4.2 * len(cosines), 4))
    axes = fig.subplots(1, len(cosines), squeeze=False)
    for ax, (name, values) in zip(axes[0], cosines.items(), strict=True):
        ax.scatter(human, values, s=14, alpha=0.6)
        ax.set_title(f"{name}\nSpearman {stats[name]['spearman']:.2f}", fontsize=9)
        ax.set_xlabel("human score (0-5)")
        ax.set_ylabel("cosine similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = pg.argument_parser(__doc__.splitlines()[0], "use N pairs spread over the score range")
    args = parser.parse_args(argv)

    pairs = load_pairs(args.limit)
    human = np.array([p["score"] for p in pairs])
    sentences = unique_sentences(pairs)
    client = pg.make_client()
    models = pg.choose_models(client, args.models)
    print(f"{len(pairs)} pairs ({len(sentences)} sentences); models: {', '.join(models)}")

    cosines = {TFIDF: tfidf_cosines(pairs)}
    rates: dict[str, float] = {}
    for model in models:
        e = pg.embed(client, model, sentences, args.batch_size)
        rates[model] = e.per_second
        cosines[model] = pair_cosines(dict(zip(sentences, e.vectors, strict=True)), pairs)

    stats = {name: correlations(values, human) for name, values in cosines.items()}
    rows = [[name, s["spearman"], s["pearson"], len(pairs), rates.get(name)] for name, s in stats.items()]
    print(pg.format_table(["features", "Spearman", "Pearson", "pairs", "emb/s"], rows))

    out = pg.results_dir(args.results)
    plot(cosines, human, stats, out / "similarity.png")
    result = {"pairs": len(pairs), "correlations": stats, "embeddings_per_second": rates}
    pg.write_json(out / "similarity.json", result)
    print(f"wrote {out / 'similarity.png'} and {out / 'similarity.json'}")
    return result


if __name__ == "__main__":
    main()
