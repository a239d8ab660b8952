"""`modelfleet fetch SOURCE DEST`: the weight cache's fill command, and the progress lines it
prints, which the operator reads back from the fill pod's log (operator/cache.py).

One home for both sides of the line format, so the printer and the parser cannot drift. The
fill Job runs this in the worker image; nothing here imports kopf or the kubernetes client.

hf:// sources go through the worker's own hub download (loader.download_hf) into DEST:
huggingface_hub's snapshot_download, which honours HF_ENDPOINT and HF_TOKEN, resumes partial
files and skips complete ones; file:// and plain paths are copied. A marker file written last
makes a second run a cheap no-op, so a fill Job that runs again (its record lost, a retry
after the last step) never downloads twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from modelfleet.sources import ModelSourceError, parse_model_source

from .loader import download_hf

# Written into DEST once everything else is there: {"bytes": N, "source": "..."}.
MARKER = ".modelfleet-fetched"
# huggingface_hub keeps its download bookkeeping (and partial files) here under local_dir.
HF_BOOKKEEPING = ".cache"
PROGRESS_RE = re.compile(r"^modelfleet fetch: (\d+)(?:/(\d+))? bytes")
# The exit status of a fetch that no retry can make succeed (see `unfetchable`). The fill Job's
# podFailurePolicy fails the Job on it at once, so a mistyped model shows its error in status in
# seconds, not after the Job's retries and their back-off (about half a minute).
UNFETCHABLE_EXIT = 3


@dataclass(frozen=True)
class Progress:
    """Bytes of the model in DEST so far, of `total` when the source tells."""

    bytes: int
    total: int | None = None

    @property
    def percent(self) -> int | None:
        """Whole percent, 100 only when complete (a partial file can exceed a stale total)."""
        if not self.total:
            return None
        pct = int(100 * self.bytes / self.total)
        return 100 if self.bytes >= self.total else min(pct, 99)

    def line(self) -> str:
        """The progress line the fill pod prints (parse_progress reads it back)."""
        if self.total is None:
            return f"modelfleet fetch: {self.bytes} bytes"
        return f"modelfleet fetch: {self.bytes}/{self.total} bytes ({self.percent}%)"


def parse_progress(text: str | None) -> Progress | None:
    """The last progress line in a log tail, or None when there is none yet."""
    for line in reversed((text or "").splitlines()):
        match = PROGRESS_RE.match(line.strip())
        if match:
            total = match.group(2)
            return Progress(int(match.group(1)), int(total) if total is not None else None)
    return None


def dir_size(path: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the regular files under `path` (symlinks not followed), leaving out the
    top-level entries named in `skip`."""
    total = 0
    for root, dirs, files in os.walk(path):
        if Path(root) == path:
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # renamed under us (a finished partial file)
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


def _hf_total(repo: str, revision: str | None) -> int | None:
    """The snapshot's size from the hub's file listing, or None if it cannot be had (the
    download then says why, or goes on without a percentage)."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        files = HfApi().list_repo_tree(repo, revision=revision, recursive=True)
        return sum(f.size for f in files if isinstance(f, RepoFile))
    except Exception:  # noqa: BLE001 - only a nicer progress line depends on it
        return None


def _quiet_hub_client() -> None:
    """Our own lines report progress: tqdm's bars, and a log line per request, would flood the
    pod log between them."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _report_while(work: Callable[[], None], dest: Path, total: int | None, out: TextIO, interval: float) -> None:
    """Run `work`, printing a progress line every `interval` seconds from another thread."""
    done = threading.Event()

    def report() -> None:
        while not done.wait(interval):
            print(Progress(dir_size(dest), total).line(), file=out, flush=True)

    reporter = threading.Thread(target=report, name="fetch-progress", daemon=True)
    reporter.start()
    try:
        work()
    finally:
        done.set()
        reporter.join()


def unfetchable(exc: BaseException) -> bool:
    """Pure: whether `exc`, raised by `fetch`, would be raised again by any retry: one of the
    hub's answers that stay the same however often it is asked (no such repository, or no
    access to it: GatedRepoError is one; no such revision or file; a repository disabled), or a
    source wrong by itself (ModelSourceError of our own: unparsable, no such directory, a
    volume). Network, disk and server errors, and LocalEntryNotFoundError (the hub out of
    reach), are worth the Job's retries."""
    if not isinstance(exc, ModelSourceError):
        return False
    if exc.__cause__ is None:
        return True
    # (imported here: the operator imports this module without the hub's client)
    from huggingface_hub.errors import (
        DisabledRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    refusals = (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError, DisabledRepoError)
    return isinstance(exc.__cause__, refusals)


def fetch(source: str, dest: str | Path, out: TextIO = sys.stdout, interval: float = 2.0) -> Progress:
    """Fill DEST with SOURCE's files, printing progress lines; returns the final Progress.

    Raises ModelSourceError for a source that cannot be fetched (a hub error as the worker's
    loader words it, with the hub's class name), and whatever the copy raises (the CLI prints
    it as one line, which the fill pod's termination message and so the ModelDeployment's
    status then show)."""
    parsed = parse_model_source(source)
    dest = Path(dest)
    marker = dest / MARKER
    if marker.is_file():
        size = int(json.loads(marker.read_text()).get("bytes", 0))
        print(f"{Progress(size, size).line()}; already fetched", file=out, flush=True)
        return Progress(size, size)
    dest.mkdir(parents=True, exist_ok=True)
    if parsed.scheme == "hf":
        total = _hf_total(parsed.repo, parsed.revision)
        print(Progress(0, total).line(), file=out, flush=True)
        _quiet_hub_client()
        _report_while(lambda: download_hf(parsed, local_dir=dest), dest, total, out, interval)
    elif parsed.scheme in ("file", "path"):
        src = Path(parsed.path)
        if not src.is_dir():
            raise ModelSourceError(f"{source}: no such directory")
        total = dir_size(src)
        print(Progress(0, total).line(), file=out, flush=True)
        _report_while(lambda: shutil.copytree(src, dest, dirs_exist_ok=True, symlinks=False), dest, total, out,
                      interval)  # fmt: skip
    else:
        raise ModelSourceError(f"{source}: a pvc:// source is a volume already; nothing to fetch")
    size = dir_size(dest, skip=(HF_BOOKKEEPING, MARKER))
    marker.write_text(json.dumps({"bytes": size, "source": source}))
    final = Progress(size, size)
    print(f"{final.line()}; done", file=out, flush=True)
    return final
