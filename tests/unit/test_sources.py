"""Model sources cannot climb out of where they point: every layer a source passes, checked.

A source travels: the CRD's CEL rule (crds/, at the API server) -> modelfleet.api's validator
(objects that reached the operator under an older CRD) -> operator/render.py worker_model_arg
(the worker's --model and its volume) -> worker/loader.py local_model_dir (the directory it loads).
All but the CRD read the source with one parser, modelfleet.sources.parse_model_source.
Each attempt below must be refused by the first layer that can tell, and the chain as a whole
must never let one reach the filesystem.

Where a layer lets an attempt through today and a later layer stops it, the test is marked
xfail(strict=True) with the reason: it turns into a failure once the layer is fixed, so the
marker is removed then.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from modelfleet.api import ModelSource
from modelfleet.operator.config import OperatorConfig
from modelfleet.operator.render import worker_model_arg as render_source
from modelfleet.sources import ModelSourceError, parse_model_source
from modelfleet.worker import loader
from modelfleet.worker.loader import local_model_dir as worker_source

celpy = pytest.importorskip("celpy")

CRD = Path(__file__).resolve().parents[2] / "crds" / "modeldeployments.modelfleet.dev.yaml"
CONFIG = OperatorConfig(host_path_models=True)

# Attempts to leave a volume, the hub cache or the directory written, by scheme.
ESCAPES = [
    "file://../../x",                  # relative: resolved against the worker's cwd
    "file:///models/../etc",           # climbs out of /models
    "file:///models/%2e%2e/etc",       # the same, percent-encoded
    "pvc://claim/../..",               # out of the claim's mount, to the container's /
    "pvc://claim/..",                  # the mount root, where other claims are mounted
    "pvc://claim/sub/../../../etc",
    "pvc://claim/%2e%2e/x",            # percent-encoded: a literal name to a filesystem
    "pvc://../x",                      # no claim at all
    "hf://../x",                       # the hub client joins repo ids into cache paths
    "hf://org/..",
    "hf://org/name/../../x",
    "hf://org/name@../../x",           # ... and revisions (refs/<revision>)
    "hf://org/name@refs/../../../x",
    "hf://org/name@%2e%2e/x",
]

# What the CRD's pattern (and modelfleet.api's identical SOURCE_RE) accepts today. The fix
# belongs in crds/ and modelfleet/api.py: a second CEL rule refusing '..' segments, e.g.
# "!self.matches('(^[a-z]+://|/|@)([.]|%2[eE]){2}(/|$)')" (CEL's RE2 has no look-ahead).
CRD_ACCEPTS: set[str] = set()  # was 8 sources before the CLIMB rule; kept so a regression shows which
CRD_GAP = "the CRD pattern allows '..' segments after file:///, pvc://claim/ and hf://...@ (see CRD_ACCEPTS)"


def crd_rule():
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    source = schema["properties"]["spec"]["properties"]["model"]["properties"]["source"]
    (rule,) = source["x-kubernetes-validations"]
    env = celpy.Environment()
    return env.program(env.compile(rule["rule"]))


CEL = crd_rule()


def crd_allows(source: str) -> bool:
    return bool(CEL.evaluate({"self": celpy.celtypes.StringType(source)}))


def api_allows(source: str) -> bool:
    try:
        ModelSource.model_validate({"source": source})
    except ValidationError:
        return False
    return True


def params(gaps: set[str], reason: str) -> list:
    return [pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=reason)) if s in gaps else s
            for s in ESCAPES]


# --- the CRD and modelfleet.api -----------------------------------------------------------------

@pytest.mark.parametrize("source", params(CRD_ACCEPTS, CRD_GAP))
def test_the_crd_refuses(source: str) -> None:
    assert not crd_allows(source)


@pytest.mark.parametrize("source", params(CRD_ACCEPTS, CRD_GAP))
def test_the_typed_api_refuses(source: str) -> None:
    with pytest.raises(ValidationError, match="spec.model.source must be"):
        ModelSource.model_validate({"source": source})


@pytest.mark.parametrize("source", ESCAPES)
def test_the_crd_and_the_typed_api_agree(source: str) -> None:
    assert crd_allows(source) == api_allows(source) == (source in CRD_ACCEPTS)


# --- operator/render.py -------------------------------------------------------------------------

@pytest.mark.parametrize("source", ESCAPES)
def test_render_refuses_with_the_workers_message(source: str, tmp_path: Path, monkeypatch) -> None:
    """One parser: what reaches the operator is refused with the very line the worker would
    print ('%2e%2e' too: refused, not left for a filesystem to take as a name)."""
    with pytest.raises(ModelSourceError) as rendered:
        render_source(source, CONFIG)
    monkeypatch.setattr(loader, "PVC_MOUNT_ROOT", str(tmp_path))
    with pytest.raises(ModelSourceError) as worker:
        worker_source(source)
    assert str(rendered.value) == str(worker.value)


def test_render_keeps_pvc_sources_inside_their_claim() -> None:
    resolved = render_source("pvc://claim/./org//a..b/", CONFIG)
    assert resolved.path == f"{CONFIG.pvc_mount_root}/claim/org/a..b"
    assert resolved.mount == {"name": "model", "mountPath": f"{CONFIG.pvc_mount_root}/claim", "readOnly": True}


def test_render_refuses_file_sources_that_climb() -> None:
    with pytest.raises(ValueError):
        render_source("file:///models/../etc", CONFIG)


# --- worker/loader.py ---------------------------------------------------------------------------

@pytest.mark.parametrize("source", ESCAPES)
def test_the_worker_refuses_with_a_clear_reason(source: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(loader, "PVC_MOUNT_ROOT", str(tmp_path / "mnt"))
    # Every target exists and looks like a model, so only the source check can refuse.
    for target in (tmp_path / "mnt", tmp_path / "mnt" / "claim", tmp_path / "x", tmp_path / "etc"):
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "mnt" / "claim")
    with pytest.raises(ModelSourceError) as info:
        worker_source(source)
    message = str(info.value)
    assert "does not exist" not in message and "no config.json" not in message, message
    assert "'..' path segment" in message or "look like" in message or "must be" in message \
        or "absolute path" in message, message


@pytest.mark.parametrize(("source", "repo_id", "revision"), [
    ("hf://gpt2", "gpt2", None),  # the hub's legacy org-less ids: the CRD allows them, vLLM takes them
    ("hf://bert-base-uncased@main", "bert-base-uncased", "main"),
    ("hf://org/name@v1", "org/name", "v1"),
])
def test_the_worker_downloads_hub_ids_with_or_without_an_org(source, repo_id, revision, tmp_path, monkeypatch) -> None:
    import huggingface_hub

    asked = []

    def snapshot_download(**kwargs):
        asked.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert worker_source(source) == tmp_path
    assert asked == [{"repo_id": repo_id, "revision": revision, "local_dir": None}]  # into the hub's cache


def test_the_worker_still_resolves_sources_that_stay_put(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(loader, "PVC_MOUNT_ROOT", str(tmp_path))
    model = tmp_path / "claim" / "org" / "a..b"  # '..' inside a name is not a segment
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert worker_source("pvc://claim/org/a..b") == model
    assert worker_source("pvc://claim/./org/a..b/") == model
    assert worker_source(f"file://{model}") == model
    assert worker_source(str(model)) == model


@pytest.mark.parametrize("source", ESCAPES)
def test_no_escape_passes_the_whole_chain(source: str, tmp_path: Path, monkeypatch) -> None:
    """CRD -> api -> render -> worker: some layer refuses before a file is read. (file://
    sources name a node directory by design; a climbing one is refused by the worker when it
    gets the source itself, as `modelfleet serve` and `worker` do, and by nothing in-cluster,
    where render hands the worker the normalized path: see test_render_refuses_...)"""
    if not crd_allows(source) or not api_allows(source):
        return
    try:
        resolved = render_source(source, CONFIG)
    except ValueError:
        return
    if source.startswith("pvc://"):
        assert resolved.path.startswith(resolved.mount["mountPath"] + "/")
        return
    if source.startswith("file://"):
        with pytest.raises(ModelSourceError):
            worker_source(source)
        return
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelSourceError, match=r"'\.\.' path segment"):
        worker_source(resolved.path)


# --- modelfleet.sources: the one parser ---------------------------------------------------------

@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ("hf://org/name@v1.2", {"scheme": "hf", "repo": "org/name", "revision": "v1.2"}),
        ("hf://gpt2", {"scheme": "hf", "repo": "gpt2", "revision": None}),  # the CRD allows it; vLLM takes it
        ("hf://org/name@refs/pr/1", {"scheme": "hf", "repo": "org/name", "revision": "refs/pr/1"}),
        ("file:///models/./tiny//", {"scheme": "file", "path": "/models/tiny"}),
        ("pvc://claim", {"scheme": "pvc", "claim": "claim", "sub_path": ""}),
        ("pvc://claim/", {"scheme": "pvc", "claim": "claim", "sub_path": ""}),
        ("pvc://claim/a/./b/", {"scheme": "pvc", "claim": "claim", "sub_path": "a/b"}),
        ("relative/dir", {"scheme": "path", "path": "relative/dir"}),
    ],
)
def test_the_parser_reads_each_scheme(source: str, fields: dict) -> None:
    parsed = parse_model_source(source)
    assert parsed.text == source
    assert {k: getattr(parsed, k) for k in fields} == fields


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("s3://bucket/model", "unsupported model source scheme in 's3://bucket/model': use a path, file://, hf:// or pvc://"),
        ("file://models/x", "file:// sources take an absolute path (file:///abs/path), got 'file://models/x'"),
        ("pvc://Claim/x", "pvc:// sources look like pvc://claim/sub/path with a lowercase claim name, got 'pvc://Claim/x'"),
        ("hf://a/b/c", "hf:// sources look like hf://[org/]name[@revision], got hf://a/b/c"),
        ("hf://org/na me", "hf:// repo must be [org/]name of letters, digits and . _ -, got hf://org/na me"),
        ("hf://org/name@/main", "hf:// revision must be a branch, tag or commit, got hf://org/name@/main"),
        ("pvc://c/a/../b", "model source 'pvc://c/a/../b' has a '..' path segment; name the directory itself"),
    ],
)
def test_the_parser_says_what_is_wrong(source: str, message: str) -> None:
    with pytest.raises(ModelSourceError) as info:
        parse_model_source(source)
    assert str(info.value) == message


def test_pvc_paths_stay_under_the_mount_root() -> None:
    parsed = parse_model_source("pvc://claim/sub/dir")
    assert parsed.mount_path("/mnt/models") == "/mnt/models/claim"
    assert parsed.claim_path("/mnt/models") == "/mnt/models/claim/sub/dir"
    assert parse_model_source("pvc://claim").claim_path("/m") == "/m/claim"


def test_the_typed_api_and_the_parser_agree_on_what_the_crd_pattern_accepts() -> None:
    """What passes the CRD's pattern also parses: the operator never meets a source the
    validator let through and the parser refuses (hf://...@/x now fails at the validator)."""
    for source in ["hf://org/name@main", "hf://gpt2", "file:///m", "pvc://c", "pvc://c/a/b"]:
        assert api_allows(source) and parse_model_source(source)
    assert not api_allows("hf://org/name@/main")
