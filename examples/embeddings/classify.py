"""Classify product reviews from their embeddings, per served model, next to a TF-IDF baseline.

Two tasks on the same reviews: the product category (6 classes) and the sentiment (2 classes).
Each feature set (TF-IDF or a model's embeddings) trains a logistic regression and a kNN on the
train split and is scored on the test split, so the table shows what the embeddings add over
word counts. Usage: `python examples/embeddings/classify.py [--models A B] [--limit N]`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import playground as pg  # the shared module beside this script
from matplotlib.figure import Figure  # no pyplot: no backend or display needed to write a PNG
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier

TASKS = ("category", "sentiment")
TFIDF = "tf-idf (baseline)"
Features = Any  # a dense array of embeddings or a sparse TF-IDF matrix; scikit-learn takes both


@dataclass
class Score:
    features: str
    classifier: str
    task: str
    accuracy: float
    macro_f1: float


def classifiers(k: int) -> dict[str, Callable[[], object]]:
    """Fresh scikit-learn estimators by name; cosine kNN because the vectors are directions."""
    return {
        "logistic regression": lambda: LogisticRegression(max_iter=2000),
        f"kNN (k={k})": lambda: KNeighborsClassifier(n_neighbors=k, metric="cosine"),
    }


def evaluate(features: str, train_x: Features, test_x: Features, train: list[dict], test: list[dict],
             k: int) -> list[Score]:
    """Trains every classifier on every task for one feature set and scores it on the test split."""
    scores = []
    for task in TASKS:
        y_train = [r[task] for r in train]
        y_test = [r[task] for r in test]
        for name, make in classifiers(k).items():
            predicted = make().fit(train_x, y_train).predict(test_x)
            scores.append(Score(features, name, task, accuracy_score(y_test, predicted),
                                f1_score(y_test, predicted, average="macro")))
    return scores


def chance(test: list[dict]) -> dict[str, float]:
    """Accuracy of always answering the commonest test label: what 'near chance' means here."""
    return {task: Counter(r[task] for r in test).most_common(1)[0][1] / len(test) for task in TASKS}


def tfidf_features(train: list[dict], test: list[dict]) -> tuple[Features, Features]:
    """Word and bigram counts fitted on the train split only, as a fair baseline must be."""
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    return vectorizer.fit_transform([r["text"] for r in train]), vectorizer.transform([r["text"] for r in test])


def table_rows(scores: list[Score], rates: dict[str, float]) -> list[list[object]]:
    """One row per (features, classifier): accuracy and macro-F1 for each task, and embeddings/s."""
    by_key: dict[tuple[str, str], dict[str, Score]] = {}
    for s in scores:
        by_key.setdefault((s.features, s.classifier), {})[s.task] = s
    rows = []
    for (features, classifier), tasks in by_key.items():
        row: list[object] = [features, classifier]
        for task in TASKS:
            row += [tasks[task].accuracy, tasks[task].macro_f1]
        row.append(rates.get(features))
        rows.append(row)
    return rows


def plot(scores: list[Score], baseline: dict[str, float], path: Path) -> None:
    """Grouped bars of macro-F1 per feature set and classifier, one panel per task, chance dashed."""
    fig = Figure(figsize=(6 * len(TASKS), 4.5))
    axes = fig.subplots(1, len(TASKS), sharey=True)
    for ax, task in zip(axes, TASKS, strict=True):
        rows = [s for s in scores if s.task == task]
        feature_sets = list(dict.fromkeys(s.features for s in rows))
        names = list(dict.fromkeys(s.classifier for s in rows))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            values = [next(s.macro_f1 for s in rows if s.features == f and s.classifier == name) for f in feature_sets]
            ax.bar(np.arange(len(feature_sets)) + j * width, values, width, label=name)
        ax.axhline(baseline[task], color="grey", linestyle="--", label="majority class (accuracy)")
        ax.set_xticks(np.arange(len(feature_sets)) + width * (len(names) - 1) / 2, feature_sets, fontsize=8)
        ax.set_title(f"{task}: macro-F1 on the test split")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = pg.argument_parser(__doc__.splitlines()[0], "use at most N reviews, balanced over labels and splits")
    parser.add_argument("--neighbors", type=int, default=5, help="k for the kNN classifier")
    args = parser.parse_args(argv)

    reviews = pg.stratified_head(pg.load_reviews(), args.limit, lambda r: (r["category"], r["sentiment"], r["split"]))
    train = [r for r in reviews if r["split"] == "train"]
    test = [r for r in reviews if r["split"] == "test"]
    client = pg.make_client()
    models = pg.choose_models(client, args.models)
    print(f"{len(train)} train / {len(test)} test reviews; models: {', '.join(models)}")

    scores = evaluate(TFIDF, *tfidf_features(train, test), train, test, args.neighbors)
    rates: dict[str, float] = {}
    for model in models:
        e = pg.embed(client, model, [r["text"] for r in reviews], args.batch_size)
        rates[model] = e.per_second
        vectors = dict(zip((r["id"] for r in reviews), e.vectors, strict=True))
        train_x = np.stack([vectors[r["id"]] for r in train])
        test_x = np.stack([vectors[r["id"]] for r in test])
        scores += evaluate(model, train_x, test_x, train, test, args.neighbors)

    baseline = chance(test)
    headers = ["features", "classifier", "category acc", "category F1", "sentiment acc", "sentiment F1", "emb/s"]
    print(pg.format_table(headers, table_rows(scores, rates)))
    print(f"chance (majority class accuracy): category {baseline['category']:.3f}, "
          f"sentiment {baseline['sentiment']:.3f}")

    out = pg.results_dir(args.results)
    plot(scores, baseline, out / "classify.png")
    result = {"train": len(train), "test": len(test), "chance": baseline, "embeddings_per_second": rates,
              "scores": [vars(s) for s in scores]}
    pg.write_json(out / "classify.json", result)
    print(f"wrote {out / 'classify.png'} and {out / 'classify.json'}")
    return result


if __name__ == "__main__":
    main()
