"""The embeddings playground (examples/embeddings) run as a user runs it, against `modelfleet serve`.

Each script runs as a subprocess on a reduced set with the server's default models, and the
numbers it writes must be sane: MiniLM clearly above chance, the random-weight tiny-chat merely
reported (its embeddings are noise, so no bound on how good it is).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHAT, EMBED = "tiny-chat", "all-MiniLM-L6-v2"

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "embeddings"


def run(script: str, server: str, results: Path, *args: str) -> dict:
    """Runs one example script against the server and returns the JSON it wrote."""
    env = {**os.environ, "OPENAI_BASE_URL": server + "/v1", "OPENAI_API_KEY": "EMPTY"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--results", str(results), *args],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| features" in proc.stdout  # the table is printed
    name = script.removesuffix(".py")
    assert (results / f"{name}.png").stat().st_size > 0
    result = json.loads((results / f"{name}.json").read_text())
    # The default models are those the server lists as able to embed: both demo models.
    assert set(result["embeddings_per_second"]) == {EMBED, CHAT}
    assert all(rate > 0 for rate in result["embeddings_per_second"].values())
    return result


def test_classify(server, tmp_path):
    result = run("classify.py", server, tmp_path, "--limit", "120")
    chance = result["chance"]
    scores = {(s["features"], s["classifier"], s["task"]): s for s in result["scores"]}
    minilm = scores[(EMBED, "logistic regression", "category")]
    assert minilm["accuracy"] >= chance["category"] + 0.3, minilm
    assert minilm["macro_f1"] >= 0.45, minilm
    assert scores[(EMBED, "logistic regression", "sentiment")]["accuracy"] >= chance["sentiment"] + 0.15
    tiny = [s for s in result["scores"] if s["features"] == CHAT]
    assert len(tiny) == 4 and all(0 <= s["accuracy"] <= 1 for s in tiny)
    assert any(s["features"].startswith("tf-idf") for s in result["scores"])


def test_similarity(server, tmp_path):
    result = run("similarity.py", server, tmp_path, "--limit", "60")
    assert result["pairs"] == 60
    assert result["correlations"][EMBED]["spearman"] > 0.4
    assert -1 <= result["correlations"][CHAT]["spearman"] <= 1


def test_search(server, tmp_path):
    result = run("search.py", server, tmp_path, "--limit", "120", "--show", "1")
    assert result["indexed"] == 120 and result["queries"] == 13
    recall, chance = result["recall"][EMBED], result["chance"]
    assert recall["10"] >= max(0.3, 3 * chance["10"]), recall
    assert 0 <= result["recall"][CHAT]["10"] <= 1
