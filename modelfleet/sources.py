"""Model sources, parsed once: `hf://[org/]name[@revision]`, `file:///abs/path`, `pvc://claim/sub/path`
or a plain local path.

Pure (no I/O), so that every layer a source passes reads it the same way and refuses the same
mistake with the same message: `modelfleet.api`'s validator (after the CRD's CEL rule, mirrored
here as SOURCE_RE and CLIMB_RE), the operator's `worker_model_arg` (the worker's --model and its
volume), the worker's `local_model_dir` (the directory it loads) and `modelfleet serve`.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

Scheme = Literal["hf", "file", "pvc", "path"]

# The CRD's CEL rules for spec.model.source, character for character (tests/unit/operator/
# test_crd_schema.py compares them): file:///abs/path, hf://org/name[@revision] (org optional),
# pvc://claim[/sub/path]; and a '..' path segment (also percent-encoded). CEL's RE2 has no
# look-ahead, hence two patterns. The parser below refuses everything CLIMB_RE matches.
SOURCE_RE = (
    r"^(file:///.*|hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(@[A-Za-z0-9._/-]+)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?)$"
)
CLIMB_RE = r"(^[a-z]+://|/|@)([.]|%2[eE]){2}(/|$)"

# A claim name (a DNS label, as the CRD's pattern has it) and a hub repo id's segments.
CLAIM_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
HF_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
HF_REVISION_RE = re.compile(r"[A-Za-z0-9._/-]+")
# A hub repo id, with or without its org: the hub still serves its legacy org-less ids (gpt2,
# bert-base-uncased, redirected to their org), as the CRD's pattern, vLLM and the own worker take them.
HF_FORM = "hf:// sources look like hf://[org/]name[@revision]"


class ModelSourceError(ValueError):
    """A source that cannot be parsed, resolved or loaded; shown to the user as one line."""


@dataclass(frozen=True)
class ModelSource:
    """One parsed, validated source. `path` is the normalized absolute path of file:// and the
    path as written of a plain one; `sub_path` is pvc://'s path inside its claim ('' for the
    claim's root); `repo` and `revision` are hf://'s."""

    text: str
    scheme: Scheme
    path: str = ""
    claim: str = ""
    sub_path: str = ""
    repo: str = ""
    revision: str | None = None

    def mount_path(self, root: str) -> str:
        """Where a pvc:// source's claim is mounted, under `root`."""
        return posixpath.join(root, self.claim)

    def claim_path(self, root: str) -> str:
        """A pvc:// source's directory when its claim is mounted under `root`."""
        mount = self.mount_path(root)
        path = posixpath.normpath(posixpath.join(mount, self.sub_path)) if self.sub_path else mount
        if path != mount and not path.startswith(mount + "/"):  # belt and braces: no '..' got here
            raise ModelSourceError(f"model source {self.text!r} leaves its volume")
        return path


def _no_parent_segments(source: str, path: str) -> None:
    """Refuses `..` segments, percent-encoded ones too: a URL source names its directory
    directly, so a source cannot climb out of its volume (pvc://), the hub cache (hf://) or
    the directory its author meant (file://)."""
    if any(unquote(segment) == ".." for segment in path.split("/")):
        raise ModelSourceError(f"model source {source!r} has a '..' path segment; name the directory itself")


def parse_model_source(source: str) -> ModelSource:
    """Parses and validates SOURCE, or raises ModelSourceError saying what is wrong with it."""
    if source.startswith("file://"):
        raw = source[len("file://") :]
        if not raw.startswith("/"):
            raise ModelSourceError(f"file:// sources take an absolute path (file:///abs/path), got {source!r}")
        _no_parent_segments(source, raw)
        return ModelSource(source, "file", path=posixpath.normpath(raw))
    if source.startswith("hf://"):
        return _parse_hf(source)
    if source.startswith("pvc://"):
        claim, _, sub = source[len("pvc://") :].partition("/")
        if not CLAIM_RE.fullmatch(claim):
            raise ModelSourceError(f"pvc:// sources look like pvc://claim/sub/path with a lowercase claim name, "
                                   f"got {source!r}")
        _no_parent_segments(source, sub)
        sub_path = posixpath.normpath(sub) if sub else ""
        return ModelSource(source, "pvc", claim=claim, sub_path="" if sub_path == "." else sub_path)
    if "://" in source:
        raise ModelSourceError(f"unsupported model source scheme in {source!r}: use a path, file://, hf:// or pvc://")
    return ModelSource(source, "path", path=source)


def _parse_hf(source: str) -> ModelSource:
    repo, _, revision = source[len("hf://") :].partition("@")
    if repo.count("/") > 1:
        raise ModelSourceError(f"{HF_FORM}, got {source}")
    # The hub client joins repo and revision into cache paths (refs/<revision>): only names.
    if not all(HF_SEGMENT_RE.fullmatch(part) and ".." not in part for part in repo.split("/")):
        raise ModelSourceError(f"hf:// repo must be [org/]name of letters, digits and . _ -, got {source}")
    if revision:
        _no_parent_segments(source, revision)
        if not HF_REVISION_RE.fullmatch(revision) or revision.startswith("/"):
            raise ModelSourceError(f"hf:// revision must be a branch, tag or commit, got {source}")
    return ModelSource(source, "hf", repo=repo, revision=revision or None)
