"""How fast the operator turns a burst of ModelDeployments into Deployments and status, on the
local cluster, and what it costs in CPU and memory:

  modelfleet-operator    N ModelDeployments (replicas 0, so no model loads) created at once;
                         per object, seconds from its create call returning to its Deployment
                         appearing and to its status being written (observedGeneration)
  deployment-controller  baseline, same run and cluster: N plain Deployments (replicas 0);
                         seconds to their ReplicaSet and to the controller's observedGeneration,
                         i.e. what Kubernetes' own controller manages on this machine

After the burst the operator idles with all N objects (resyncs every --resync-seconds), so the
memory samples show whether it grows with time. Goal (issue 6): p95 under 2 s, flat memory.

    python bench/operator_scale.py [--quick] [--objects N]

Needs the local cluster (`make cluster-up`; started here if it is not running, and stopped at
the end only then, unless MODELFLEET_KEEP_CLUSTER is set), found through .cluster/env. Uses its own namespaces (prefix
mf-e2e-op-bench-), deleted at the end; the CRD is applied, never deleted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import percentile, print_table, ratio, write_results  # noqa: E402

from modelfleet.devcluster import (  # noqa: E402
    NS_PREFIX,
    OperatorProcess,
    create_namespace,
    delete_model_deployments,
    delete_namespace,
    install_crds,
    model_deployment,
    use_cluster_env,
)

GOAL_P95_S = 2.0


# -- the cluster ---------------------------------------------------------------------------------

def ensure_cluster() -> bool:
    """Use the running local cluster, or start it; True if started here."""
    started = False
    if subprocess.run(["make", "-s", "cluster-status"], cwd=REPO, capture_output=True).returncode != 0:
        print("starting the local cluster (make cluster-up) ...", flush=True)
        subprocess.run(["make", "-s", "cluster-up"], cwd=REPO, check=True)
        started = True
    use_cluster_env()
    return started


def api_client() -> Any:
    from kubernetes import config

    return config.new_client_from_config(os.environ["KUBECONFIG"])


# -- the operator's CPU and memory ---------------------------------------------------------------

class ProcSampler:
    """CPU seconds and RSS of one process over time (psutil if installed, else /proc)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, cpu seconds, rss MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")
        try:
            import psutil

            self._ps: Any = psutil.Process(pid)
        except ImportError:
            self._ps = None

    def read(self) -> tuple[float, float]:
        if self._ps is not None:
            cpu = self._ps.cpu_times()
            return cpu.user + cpu.system, self._ps.memory_info().rss / 2**20
        stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / self._tick  # utime, stime (fields 14, 15)
        rss_kib = next(int(line.split()[1]) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
        return cpu, rss_kib / 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                cpu, rss = self.read()
            except (OSError, StopIteration, ValueError):
                return
            self.samples.append((time.monotonic(), cpu, rss))
            self._stop.wait(self.interval)

    def start(self) -> ProcSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def window(self, t0: float, t1: float) -> dict[str, float | None]:
        """CPU use (percent of one core) and RSS between two monotonic times."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {"cpu_pct": None, "rss_mib_max": None, "rss_mib_end": None}
        (a, ca, _), (b, cb, rss_end) = inside[0], inside[-1]
        return {"cpu_pct": round(100 * (cb - ca) / (b - a), 1), "rss_mib_max": round(max(s[2] for s in inside), 1),
                "rss_mib_end": round(rss_end, 1)}


# -- watching for the outcome --------------------------------------------------------------------

class FirstSeen:
    """A watch on one kind in one namespace that records when each object first met `test`."""

    def __init__(self, list_fn: Any, namespace: str, test: Any, **kwargs: Any) -> None:
        self.list_fn, self.namespace, self.test, self.kwargs = list_fn, namespace, test, kwargs
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for event in w.stream(self.list_fn, self.namespace, timeout_seconds=5, **self.kwargs):
                    now = time.monotonic()
                    obj = event["object"]
                    obj = obj if isinstance(obj, dict) else obj.to_dict()
                    name = obj["metadata"]["name"]
                    if name not in self.seen and self.test(obj):
                        self.seen[name] = now
                    if self._stop.is_set():
                        break
            except Exception as exc:  # noqa: BLE001 - a dropped watch is re-opened
                print(f"watch error (re-opening): {exc}", file=sys.stderr)
                time.sleep(0.2)

    def start(self) -> FirstSeen:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _get(obj: dict, *path: str) -> Any:
    for key in path:
        obj = (obj or {}).get(key)  # type: ignore[assignment]
    return obj


def _status_written(obj: dict) -> bool:
    status = obj.get("status") or {}
    meta = obj.get("metadata") or {}
    return status.get("observedGeneration") == meta.get("generation") and bool(status.get("conditions"))


def _controller_done(obj: dict) -> bool:
    return _get(obj, "status", "observed_generation") == _get(obj, "metadata", "generation")


def latencies(applied: dict[str, float], seen: dict[str, float]) -> tuple[list[float], int]:
    """Seconds from create to seen, for the objects seen; and how many were never seen."""
    out = [seen[n] - t for n, t in applied.items() if n in seen]
    return out, len(applied) - len(out)


def summary(values: list[float]) -> dict[str, float | None]:
    r = lambda v: None if v is None else round(v, 3)  # noqa: E731
    return {"p50_s": r(percentile(values, 50)), "p95_s": r(percentile(values, 95)), "max_s": r(max(values, default=None))}


def wait_all(watchers: list[FirstSeen], names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(all(n in w.seen for n in names) for w in watchers):
        time.sleep(0.2)


# -- the scenarios -------------------------------------------------------------------------------

def run_operator(api: Any, n: int, source: str, idle: float, resync: float, workers: int,
                 workdir: Path) -> dict[str, Any]:
    from kubernetes import client

    ns = f"{NS_PREFIX}bench-{uuid.uuid4().hex[:6]}"
    create_namespace(ns)
    op = OperatorProcess([ns], workdir / "operator.log", "--no-scrape", "--workers", str(workers),
                         resync_seconds=resync)
    custom, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
    try:
        op.start()
        assert op.proc is not None
        sampler = ProcSampler(op.proc.pid).start()
        time.sleep(3)  # idle baseline
        deployments = FirstSeen(apps.list_namespaced_deployment, ns, lambda o: True).start()
        statuses = FirstSeen(lambda namespace, **kw: custom.list_namespaced_custom_object(
            "modelfleet.dev", "v1alpha1", namespace, "modeldeployments", **kw), ns, _status_written).start()
        time.sleep(0.5)  # let both watches open
        names = [f"bench-{i:04d}" for i in range(n)]
        applied: dict[str, float] = {}
        t0 = time.monotonic()
        for name in names:
            body = model_deployment(name, source, replicas=0)
            custom.create_namespaced_custom_object("modelfleet.dev", "v1alpha1", ns, "modeldeployments", body)
            applied[name] = time.monotonic()
        created_in = time.monotonic() - t0
        wait_all([deployments, statuses], names, timeout=120 + n)
        t_burst = time.monotonic()
        print(f"  {n} created in {created_in:.1f}s; all handled after {t_burst - t0:.1f}s; idling {idle:.0f}s",
              flush=True)
        time.sleep(idle)
        t_end = time.monotonic()
        deployments.stop()
        statuses.stop()
        sampler.stop()
        created, missing_d = latencies(applied, deployments.seen)
        written, missing_s = latencies(applied, statuses.seen)
        burst, rest = sampler.window(t0, t_burst), sampler.window(t_burst, t_end)
        idle_first = sampler.window(t_burst, t_burst + min(idle / 3, 20))
        start_rss = sampler.samples[0][2] if sampler.samples else None
        return {
            "scenario": "modelfleet-operator", "objects": n, "create_calls_s": round(created_in, 2),
            **{f"created_{k}": v for k, v in summary(created).items()},
            **{f"status_{k}": v for k, v in summary(written).items()},
            "missing": missing_d + missing_s,
            "cpu_pct_burst": burst["cpu_pct"], "cpu_pct_idle": rest["cpu_pct"],
            "rss_mib_start": round(start_rss, 1) if start_rss else None, "rss_mib_peak": burst["rss_mib_max"],
            "rss_mib_idle_early": idle_first["rss_mib_end"], "rss_mib_end": rest["rss_mib_end"],
            "_created": created, "_written": written,
            "_rss": [(round(t - t0, 2), round(r, 1)) for t, _, r in sampler.samples],
        }
    finally:
        delete_model_deployments(ns, timeout=120 + n)  # while the operator runs: kopf's finalizers
        op.stop()
        delete_namespace(ns)


def run_baseline(api: Any, n: int) -> dict[str, Any]:
    from kubernetes import client

    ns = f"{NS_PREFIX}bench-base-{uuid.uuid4().hex[:6]}"
    create_namespace(ns)
    apps = client.AppsV1Api(api)
    try:
        sets = FirstSeen(apps.list_namespaced_replica_set, ns, lambda o: True).start()
        done = FirstSeen(apps.list_namespaced_deployment, ns, _controller_done).start()
        time.sleep(0.5)
        names = [f"base-{i:04d}" for i in range(n)]
        applied: dict[str, float] = {}
        t0 = time.monotonic()
        for name in names:
            labels = {"app": name}
            body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                    "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                             "template": {"metadata": {"labels": labels},
                                          "spec": {"containers": [{"name": "c", "image": "modelfleet/none"}]}}}}
            apps.create_namespaced_deployment(ns, body)
            applied[name] = time.monotonic()
        created_in = time.monotonic() - t0
        # ReplicaSets are named NAME-HASH: map them back to their Deployment.
        wait_all([done], names, timeout=120 + n)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(sets.seen) < n:
            time.sleep(0.2)
        sets.stop()
        done.stop()
        rs_seen = {name.rsplit("-", 1)[0]: t for name, t in sets.seen.items()}
        created, missing_c = latencies(applied, rs_seen)
        written, missing_s = latencies(applied, done.seen)
        return {
            "scenario": "deployment-controller", "objects": n, "create_calls_s": round(created_in, 2),
            **{f"created_{k}": v for k, v in summary(created).items()},
            **{f"status_{k}": v for k, v in summary(written).items()},
            "missing": missing_c + missing_s, "_created": created, "_written": written,
        }
    finally:
        delete_namespace(ns)


# -- results -------------------------------------------------------------------------------------

def plot(rows: list[dict[str, Any]]):
    def draw(ax: Any) -> None:
        styles = {"modelfleet-operator": "tab:blue", "deployment-controller": "tab:gray"}
        for row in rows:
            for key, dash, what in (("_created", "-", "child created"), ("_written", "--", "status written")):
                values = sorted(row[key])
                if values:
                    ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], dash,
                            color=styles[row["scenario"]], label=f"{row['scenario']}: {what}")
        ax.axvline(GOAL_P95_S, color="tab:red", lw=1, ls=":", label=f"goal: p95 < {GOAL_P95_S:g} s")
        ax.axhline(0.95, color="black", lw=0.5, ls=":")
        ax.set_xlabel("seconds from create to ...")
        ax.set_ylabel("fraction of objects")
        ax.set_title(f"{rows[0]['objects']} objects created at once (local cluster)")
        ax.legend(loc="best", fontsize=7)
        op = rows[0]
        if op.get("_rss"):
            inset = ax.inset_axes([0.42, 0.14, 0.28, 0.2])
            inset.plot([t for t, _ in op["_rss"]], [r for _, r in op["_rss"]], color="tab:green")
            inset.set_title("operator RSS (MiB) over the run", fontsize=7)
            inset.tick_params(labelsize=6)

    return draw


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="40 objects and a short idle phase (~2 min)")
    p.add_argument("--objects", type=int, default=None, help="default 200 (40 with --quick)")
    p.add_argument("--idle", type=float, default=None, help="seconds to idle with all objects (default 60; 20 quick)")
    p.add_argument("--resync-seconds", type=float, default=10.0, help="the operator's resync interval")
    p.add_argument("--workers", type=int, default=8, help="the operator's --workers (reconciles at once)")
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args()
    n = args.objects or (40 if args.quick else 200)
    idle = args.idle if args.idle is not None else (20.0 if args.quick else 60.0)

    started = ensure_cluster()
    try:
        install_crds()
        api = api_client()
        source = "file:///models/bench-unused"  # replicas 0: never loaded
        with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp:
            print(f"modelfleet-operator: {n} ModelDeployments", flush=True)
            rows = [run_operator(api, n, source, idle, args.resync_seconds, args.workers, Path(tmp))]
            if rows[0]["missing"]:
                print(f"  operator log tail:\n{(Path(tmp) / 'operator.log').read_text()[-3000:]}")
        if not args.no_baseline:
            print(f"deployment-controller: {n} Deployments", flush=True)
            rows.append(run_baseline(api, n))
    finally:
        if started and not os.environ.get("MODELFLEET_KEEP_CLUSTER"):
            subprocess.run(["make", "-s", "cluster-down"], cwd=REPO)

    op = rows[0]
    base = rows[1] if len(rows) > 1 else {}
    growth = ratio(op.get("rss_mib_end"), op.get("rss_mib_idle_early"))
    ratios = {
        # <= 1 meets the goal (p95 under 2 s)
        "deployment_created_p95_over_goal": ratio(op["created_p95_s"], GOAL_P95_S),
        "status_written_p95_over_goal": ratio(op["status_p95_s"], GOAL_P95_S),
        "goal_p95_under_2s_met": bool(op["created_p95_s"] is not None and op["status_p95_s"] is not None
                                      and op["created_p95_s"] < GOAL_P95_S and op["status_p95_s"] < GOAL_P95_S
                                      and not op["missing"]),
        # flat memory: RSS at the end of the idle phase over RSS early in it (~1.0 is flat)
        "rss_end_over_idle_early": growth,
        "goal_flat_memory_met": bool(growth is not None and growth < 1.10),
        # the operator against Kubernetes' own controller on the same cluster (> 1: slower)
        "status_p95_vs_deployment_controller": ratio(op["status_p95_s"], base.get("status_p95_s")),
        "created_p95_vs_deployment_controller": ratio(op["created_p95_s"], base.get("created_p95_s")),
    }
    config = {"objects": n, "idle_seconds": idle, "resync_seconds": args.resync_seconds, "quick": args.quick,
              "workers": args.workers,
              "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0]}
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    print_table(public, ["scenario", "objects", "create_calls_s", "created_p50_s", "created_p95_s",
                         "status_p50_s", "status_p95_s", "missing"])
    print_table(public[:1], ["cpu_pct_burst", "cpu_pct_idle", "rss_mib_start", "rss_mib_peak",
                             "rss_mib_idle_early", "rss_mib_end"])
    for key, value in ratios.items():
        print(f"{key}: {value}")
    path = write_results("operator_scale", config, public + [{"scenario": "operator-rss-trace", "rss": op["_rss"]}],
                         ratios, plot(rows))
    print(f"wrote {path}")
    return 0  # a missed goal shows in the ratios; the run itself succeeded


if __name__ == "__main__":
    sys.exit(main())
