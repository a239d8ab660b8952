"""Start and stop the harness's long-running processes, tracked by pid files.

Each process gets its own session (so stopping it also stops its children), its output
appended to .cluster/logs/<name>.log, and a pid file under .cluster/run/ that outlives the
`make` that started it, so `cluster-down` can find it from another shell.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def pidfile(run: Path, name: str) -> Path:
    return run / f"{name}.pid"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def read_pid(run: Path, name: str) -> int | None:
    """The pid in the file, or None if that pid is no longer the process we started (a pid
    file left by a killed session must never make us signal an unrelated process)."""
    try:
        pid_s, started = pidfile(run, name).read_text().split()[:2]
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    return pid if _start_time(pid) == started else None


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(run: Path, logs: Path, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start `argv` detached from our session; returns its pid."""
    run.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / f"{name}.log", "ab")
    log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {' '.join(argv)}\n".encode())
    log.flush()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, env=env, close_fds=True,
    )
    log.close()
    pidfile(run, name).write_text(f"{proc.pid} {_start_time(proc.pid)}\n")
    return proc.pid


def _group_members(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def kill_orphans(run: Path, name: str) -> None:
    """Kill what is left of a process we started whose leader is already gone (killed by
    SIGKILL, say, leaving nginx workers behind). The leader's pid names the group; Linux
    does not reuse a pid while a group by that id has members, so they are ours."""
    try:
        pid = int(pidfile(run, name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if read_pid(run, name) is None and not alive(pid):
        for member in _group_members(pid):
            try:
                os.kill(member, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_orphaned_nginx_workers() -> list[int]:
    """nginx workers outlive a SIGKILLed master (a session that ended), holding the ingress
    port. Ours are recognisable: orphans (parent 1) writing to a harness `logs/nginx-*.log`,
    which no other nginx on the machine does. Returns the pids killed."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(b"nginx: worker process"):
                continue
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != 1:
                continue
            targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except (OSError, ValueError, IndexError):
            continue
        if any(t.endswith(("/logs/nginx-error.log", "/logs/nginx-access.log")) for t in targets):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except ProcessLookupError:
                pass
    return killed


def signal_group(pid: int, sig: int) -> None:
    """Signal the process's whole session (it leads one), falling back to the pid alone."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop(run: Path, name: str, grace: float = 10.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; removes the pid file."""
    pid = read_pid(run, name)
    if alive(pid):
        assert pid is not None
        signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if alive(pid):
            signal_group(pid, signal.SIGKILL)
            while alive(pid):
                _reap(pid)
                time.sleep(0.05)
        # Children that outlived their leader are still in its process group.
        signal_group(pid, signal.SIGKILL)
    pidfile(run, name).unlink(missing_ok=True)


def _reap(pid: int) -> None:
    """Collect our own child's exit status so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
