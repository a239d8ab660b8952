"""Model sources and what the loader detects from the files alone."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from modelfleet.demo import minilm_path
from modelfleet.worker.loader import ModelSourceError, detect, local_model_dir


def test_local_paths_and_file_urls(demo_path):
    assert local_model_dir(str(demo_path)) == demo_path
    assert local_model_dir(f"file://{demo_path}") == demo_path


@pytest.mark.parametrize("source", ["/no/such/dir", "s3://bucket/model", "hf://a/b/c"])
def test_bad_sources_say_why(source):
    with pytest.raises(ModelSourceError):
        local_model_dir(source)


def test_pvc_sources_map_to_the_mount_root(tmp_path, demo_path, monkeypatch):
    import modelfleet.worker.loader as loader

    shutil.copytree(demo_path, tmp_path / "claim" / "sub")
    monkeypatch.setattr(loader, "PVC_MOUNT_ROOT", str(tmp_path))
    assert local_model_dir("pvc://claim/sub") == tmp_path / "claim" / "sub"


def test_hf_sources_resolve_through_the_hub_cache(tmp_path, demo_path):
    """The real hf:// code path, offline, against a cache laid out as the hub leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(demo_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = textwrap.dedent(f"""
        from modelfleet.worker.loader import local_model_dir
        print(local_model_dir("hf://acme/tiny"))
        print(local_model_dir("hf://acme/tiny@{commit}"))
    """)
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(repo / "snapshots" / commit)] * 2


def test_org_less_hf_sources_resolve_through_the_hub_cache(tmp_path, demo_path):
    """`hf://gpt2`: a hub id without its org, cached as the hub leaves it (models--gpt2), offline."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--gpt2"
    shutil.copytree(demo_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = "from modelfleet.worker.loader import local_model_dir; print(local_model_dir('hf://gpt2'))"
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(repo / "snapshots" / commit)]


def test_detects_tasks_context_and_template(demo_path, tmp_path):
    chat = detect(demo_path)
    assert chat.task == "generate" and chat.has_chat_template and chat.max_model_len == 2048
    assert chat.eos_token_ids
    embed = detect(minilm_path())
    assert embed.task == "embed" and embed.sentence_transformers and embed.max_model_len == 256
    assert detect(demo_path, max_model_len=512).max_model_len == 512
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "max_position_embeddings": 512}))
    assert detect(bare).task == "embed"
