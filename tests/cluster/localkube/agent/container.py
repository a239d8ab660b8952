"""One container of one pod: its process, its restart bookkeeping and its probes.

The process is `ip netns exec <pod netns> unshare ... launcher.py <spec>`, which execs into
the container command without forking, so the pid we hold is the container's own and a
signal to its process group reaches everything it started.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .probes import Prober


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# The kubelet's bounds for a termination message taken from the log (FallbackToLogsOnError).
MESSAGE_LOG_LINES = 80
MESSAGE_LOG_BYTES = 12 * 1024
RUN_MARKER = b"==== "  # the line launch() writes before each run of the container


def message_from_log(log: bytes, max_lines: int = MESSAGE_LOG_LINES, max_bytes: int = MESSAGE_LOG_BYTES) -> str | None:
    """The termination message FallbackToLogsOnError gives: the tail of the last run's output
    (at most `max_lines` lines and `max_bytes` bytes), or None when it printed nothing."""
    start = log.rfind(b"\n" + RUN_MARKER)
    if start >= 0:
        log = log[start + 1:]
    if log.startswith(RUN_MARKER):
        log = log.split(b"\n", 1)[1] if b"\n" in log else b""
    lines = log.rstrip(b"\n").split(b"\n")[-max_lines:]
    tail = b"\n".join(lines)[-max_bytes:].decode("utf-8", "replace").strip()
    return tail or None


def is_local_image(image: str) -> bool:
    """Images built from this project's Dockerfiles run from its Python environment."""
    return image.startswith("modelfleet/") or "modelfleet" in image.rsplit(":", 1)[0]


def is_vllm_image(image: str) -> bool:
    """vLLM's images (vllm/vllm-openai, a vllm-cpu build) run from `make vllm`'s environment."""
    return "vllm" in image.rsplit(":", 1)[0].rsplit("/", 1)[-1]


def image_bin(image: str) -> tuple[str | None, str]:
    """The folder whose programs stand in for `image` (first on PATH), or None and why not."""
    if is_local_image(image):
        return str(Path(sys.executable).parent), ""
    if is_vllm_image(image):
        from modelfleet.engines import find_vllm_python

        python = find_vllm_python()
        if python is None:
            return None, f'image "{image}" needs vLLM on this node: run `make vllm`'
        return str(Path(python).parent), ""
    return None, (f'image "{image}" is not built from this project; '
                  "the local node agent runs only modelfleet and vLLM images")


@dataclass(frozen=True)
class Terminated:
    exit_code: int
    reason: str
    started_at: str
    finished_at: str
    signal: int | None = None
    message: str | None = None

    def as_api(self) -> dict:
        t = {"exitCode": self.exit_code, "reason": self.reason, "startedAt": self.started_at,
             "finishedAt": self.finished_at}
        if self.signal:
            t["signal"] = self.signal
        if self.message:
            t["message"] = self.message
        return t


class Container:
    """Mutable runtime record of one container; the pod worker drives it."""

    def __init__(self, spec: dict, init: bool = False) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.image: str = spec.get("image", "")
        self.init = init
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: str | None = None
        self.started_mono = 0.0
        self.restart_count = 0
        self.runs = 0
        self.crashes = 0
        self.waiting: tuple[str, str] | None = ("ContainerCreating", "")
        self.terminated: Terminated | None = None  # final: will not be restarted
        self.last: Terminated | None = None
        self.next_start = 0.0
        self.readiness = Prober("readiness", spec.get("readinessProbe"))
        self.liveness = Prober("liveness", spec.get("livenessProbe"))
        self.startup = Prober("startup", spec.get("startupProbe"))
        self.spec_file: Path | None = None
        self.log_file: Path | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None

    @property
    def started(self) -> bool:
        return self.running and self.startup.result

    @property
    def ready(self) -> bool:
        return self.started and self.readiness.result

    @property
    def never_started(self) -> bool:
        return self.runs == 0

    def launch(self, argv: list[str], env: dict[str, str], cwd: str, mounts: list, hostname: str,
               prefix: list[str], spec_file: Path, log_file: Path) -> None:
        """Write the launcher spec and start the process."""
        spec_file.write_text(json.dumps({"argv": argv, "env": env, "cwd": cwd, "hostname": hostname,
                                         "mounts": [[m.source, m.target, m.read_only] for m in mounts]}))
        spec_file.chmod(0o600)
        self.spec_file = spec_file
        self.log_file = log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as log:
            log.write(f"==== {now()} start #{self.runs + 1}: {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen([*prefix, str(spec_file)], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        if self.runs:
            self.restart_count += 1
        self.runs += 1
        self.started_at = now()
        self.started_mono = time.monotonic()
        self.waiting = None
        for p in (self.readiness, self.liveness, self.startup):
            p.reset(self.started_mono)

    def poll(self) -> Terminated | None:
        """If the process has exited, record and return how."""
        if self.proc is None or self.proc.poll() is None:
            return None
        rc = self.proc.returncode
        self.proc = None
        sig = -rc if rc < 0 else None
        code = 128 + sig if sig else rc
        reason = "Completed" if code == 0 else ("StartError" if code in (126, 127) else "Error")
        return Terminated(code, reason, self.started_at or now(), now(), sig, self._message(code))

    def _message(self, code: int) -> str | None:
        """terminationMessagePolicy FallbackToLogsOnError: a failed container's last log lines.

        (No termination-message file: processes share the host's filesystem, so there is no
        per-container /dev/termination-log to read.)
        """
        if code == 0 or self.spec.get("terminationMessagePolicy") != "FallbackToLogsOnError" or not self.log_file:
            return None
        try:
            with open(self.log_file, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4 * MESSAGE_LOG_BYTES))
                return message_from_log(f.read())
        except OSError:
            return None

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace: float) -> Terminated | None:
        """SIGTERM, up to `grace` seconds, SIGKILL: the kubelet's container stop."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait()
        pid = self.proc.pid
        result = self.poll()
        try:  # anything it left behind in its process group
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return result

    def backoff(self, base: float, cap: float) -> float:
        """The kubelet's restart delay: immediate first, then doubling up to the cap; a
        container that ran for a while starts counting again."""
        if time.monotonic() - self.started_mono > 2 * cap:
            self.crashes = 0
        self.crashes += 1
        return 0.0 if self.crashes == 1 else min(cap, base * 2 ** (self.crashes - 2))
