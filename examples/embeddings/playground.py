"""What the three embedding examples share: the client, batched embedding, the data, tables, results.

The examples talk to a modelfleet server (or any OpenAI-compatible one) only through the `openai`
SDK, so they double as a template for a user's own code.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from openai import OpenAI
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "results"
# A local `modelfleet serve` listens here and accepts any key; OPENAI_BASE_URL/OPENAI_API_KEY override.
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_API_KEY = "EMPTY"
# Real clients batch; 64 short texts per request keeps a request small and the server's batcher busy.
DEFAULT_BATCH_SIZE = 64

T = TypeVar("T")


# -- server ---------------------------------------------------------------------------------------


def make_client() -> OpenAI:
    """An SDK client for the server named by the usual OpenAI environment variables."""
    return OpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
        api_key=os.environ.get("OPENAI_API_KEY") or DEFAULT_API_KEY,
        timeout=120,
    )


def embedding_models(client: OpenAI) -> list[str]:
    """Models the server says can embed (modelfleet's `capabilities.embedding` on /v1/models).

    A server that does not publish capabilities (plain OpenAI) lists every model; the user then
    names the models with --models.
    """
    names = []
    for model in client.models.list():
        capabilities = (model.model_extra or {}).get("capabilities")
        if capabilities is None or capabilities.get("embedding"):
            names.append(model.id)
    return names


def choose_models(client: OpenAI, requested: Sequence[str] | None) -> list[str]:
    """The models to compare: those asked for, else every embedding model the server lists."""
    models = list(requested) if requested else embedding_models(client)
    if not models:
        raise SystemExit("the server lists no embedding model; name one with --models")
    return models


@dataclass
class Embeddings:
    """L2-normalised vectors, one row per text, and how fast the server produced them."""

    vectors: np.ndarray
    seconds: float

    @property
    def per_second(self) -> float:
        return len(self.vectors) / self.seconds if self.seconds > 0 else float("inf")


def embed(client: OpenAI, model: str, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> Embeddings:
    """Embeds texts in batches of `batch_size` per request, with a progress bar.

    Vectors are normalised here, so a dot product is a cosine whatever the server returns.
    """
    rows: list[list[float]] = []
    start = time.perf_counter()
    with tqdm(total=len(texts), desc=f"embed {model}", unit="text", leave=False) as bar:
        for i in range(0, len(texts), batch_size):
            batch = list(texts[i : i + batch_size])
            response = client.embeddings.create(model=model, input=batch)
            rows.extend(item.embedding for item in sorted(response.data, key=lambda d: d.index))
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    vectors = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return Embeddings(vectors / np.maximum(norms, 1e-12), seconds)


# -- data -----------------------------------------------------------------------------------------


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_reviews() -> list[dict[str, Any]]:
    """The project's 300 labelled product reviews (see data/README.md)."""
    return load_jsonl(DATA / "reviews.jsonl")


def stratified_head(rows: Sequence[T], n: int | None, key: Callable[[T], Hashable]) -> list[T]:
    """The first `n` rows taken round-robin across groups, in file order within a group.

    A reduced run keeps every class (and both splits) represented, and is the same every time.
    """
    if n is None or n >= len(rows):
        return list(rows)
    groups: dict[Hashable, list[T]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    picked: list[T] = []
    depth = 0
    while len(picked) < n:
        for members in groups.values():
            if depth < len(members) and len(picked) < n:
                picked.append(members[depth])
        depth += 1
    return picked


# -- command line and output ----------------------------------------------------------------------


def argument_parser(description: str, limit_help: str) -> argparse.ArgumentParser:
    """The options every example takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="models to compare (default: every model the server lists as able to embed)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="texts per request")
    parser.add_argument("--limit", type=int, metavar="N", help=limit_help)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the PNG and JSON results")
    return parser


def results_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Machine-readable results next to the plot (the integration tests read them)."""
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.0f}"
    return "" if value is None else str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table, so a run's output can be pasted into a README as it is."""
    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in text]
    return "\n".join(lines)
