"""Runs inside a pod's network, mount and UTS namespaces, then becomes the container.

Started as `ip netns exec NS unshare --mount --uts --propagation private python3 launcher.py
SPEC.json`: it bind-mounts the pod's volumes (service-account token included) over their
mount paths, sets the hostname to the pod's name, changes directory and execs the container
command, keeping its pid, so the agent's signals reach the container itself. Standard
library only, and no imports from the package: it must start fast in a bare interpreter.
"""

import json
import os
import socket
import subprocess
import sys


def bind(fd: int, is_dir: bool, target: str, read_only: bool) -> None:
    """Bind-mounts the already opened source `fd` over `target`."""
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    # --no-canonicalize: mount(8) would otherwise read the fd link back as a path, which may
    # now resolve inside the volume that hides it; the kernel follows the link itself.
    subprocess.run(["mount", "--no-canonicalize", "--bind", f"/proc/self/fd/{fd}", target], check=True,
                   pass_fds=(fd,))
    if read_only:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)


def _same_dir(path: str, fd: int) -> bool:
    try:
        now, before = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino)


def main() -> None:
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    if len(sys.argv) > 2:  # an exec probe or `exec` into a running container
        spec["argv"] = sys.argv[2:]
    # Open every source before the first mount: a volume mounted over a parent of another
    # volume's source (an emptyDir on /tmp while the pods' files live under /tmp/...) would hide
    # it. A bind mount from /proc/self/fd/N still reaches the opened directory.
    opened = [(os.open(source, os.O_PATH), os.path.isdir(source)) for source, _, _ in spec["mounts"]]
    # Pods share the host's files, so the project (its code, the pod's own folder) must stay
    # visible even when a volume is mounted over one of its parents (an emptyDir on /tmp with
    # the repository under /tmp): it is bound back in place below.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))))
    repo_fd = os.open(repo, os.O_PATH)
    for (fd, is_dir), (_, target, read_only) in zip(opened, spec["mounts"], strict=True):
        bind(fd, is_dir, target, read_only)
        os.close(fd)
    if not _same_dir(repo, repo_fd):
        bind(repo_fd, True, repo, False)
    os.close(repo_fd)
    if spec.get("hostname"):
        socket.sethostname(spec["hostname"][:63])
    os.chdir(spec["cwd"])
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except FileNotFoundError:
        print(f"localkube: executable {argv[0]!r} not found in PATH={spec['env'].get('PATH')}", file=sys.stderr)
        sys.exit(127)
    except PermissionError:
        print(f"localkube: {argv[0]!r} is not executable", file=sys.stderr)
        sys.exit(126)


if __name__ == "__main__":
    main()
