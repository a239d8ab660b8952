"""`python -m localkube up|down|status|restart NAME|load-images [NAME...]` (`make cluster-up/-down`
run the first two)."""

from __future__ import annotations

import argparse
import sys
import time

from . import cluster, containerd, images
from .config import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localkube", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "restart", "restart-agent", "load-images"])
    parser.add_argument("component", nargs="*", help="for restart: kube-apiserver, node-agent, ...; for "
                        "load-images: which of the project's images (worker, control-plane; default all)")
    args = parser.parse_args(argv)
    settings = Settings()
    try:
        if args.command == "up":
            cluster.up(settings)
        elif args.command == "down":
            cluster.down(settings)
        elif args.command == "restart-agent":
            cluster.restart(settings, "node-agent")
        elif args.command == "restart":
            if len(args.component) != 1:
                parser.error("restart needs one component name")
            cluster.restart(settings, args.component[0])
        elif args.command == "load-images":
            began = time.monotonic()
            copied = containerd.load_project_images(settings, tuple(args.component))
            print(f"[load-images] {len(copied)} image(s) copied in {time.monotonic() - began:.1f}s", flush=True)
        else:
            ok = cluster.healthy(settings)
            print("up" if ok else "down")
            return 0 if ok else 1
    except (cluster.ClusterError, images.ImageError) as exc:
        print(f"cluster-{args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cluster-{args.command}: interrupted; stopped what had started", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
