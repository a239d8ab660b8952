"""`python -m localkube up|down|status|restart NAME` (`make cluster-up/-down` run the first two)."""

from __future__ import annotations

import argparse
import sys

from . import cluster
from .config import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localkube", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "restart", "restart-agent"])
    parser.add_argument("component", nargs="?", help="for restart: kube-apiserver, node-agent, ...")
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
            if not args.component:
                parser.error("restart needs a component name")
            cluster.restart(settings, args.component)
        else:
            ok = cluster.healthy(settings)
            print("up" if ok else "down")
            return 0 if ok else 1
    except cluster.ClusterError as exc:
        print(f"cluster-{args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cluster-{args.command}: interrupted; stopped what had started", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
