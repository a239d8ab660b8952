"""One thread per pod: sandbox, volumes, init containers, containers, probes, status, and
graceful termination on deletion, as a kubelet's pod worker does."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable

from kubernetes.client.exceptions import ApiException

from .. import network
from . import env as envmod
from . import probes, status, volumes
from .container import Container, Terminated, image_bin, now
from .runtime import Runtime, call

log = logging.getLogger(__name__)

TICK = 0.25
VOLUME_REFRESH = 5.0  # seconds between configMap/secret volume syncs (the kubelet: ~60)


class PodWorker(threading.Thread):
    def __init__(self, rt: Runtime, pod: dict, on_exit: Callable[[str], None]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.rt = rt
        self.uid: str = meta["uid"]
        self._pod = pod
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._gone = False
        self._shutdown_grace: float | None = None
        self._on_exit = on_exit
        self.dir = rt.pods_dir / f"{meta['namespace']}_{meta['name']}_{self.uid[:8]}"
        self.node = rt.nodes[pod["spec"]["nodeName"]]
        self.host_network = bool(pod["spec"].get("hostNetwork"))
        self.ip: str | None = None
        self.netns: str | None = None
        self.volume_paths: dict[str, str] | None = None
        self.start_time = now()
        self.message: str | None = None
        self.published: dict | None = None
        self.init = [Container(c, init=True) for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(c) for c in pod["spec"]["containers"]]
        self.events_sent: set[tuple[str, str]] = set()
        self._next_refresh = time.monotonic() + VOLUME_REFRESH

    # -- called from the watch thread ------------------------------------------------------
    def update(self, pod: dict) -> None:
        with self._lock:
            self._pod = pod
        self._wake.set()

    def vanish(self) -> None:
        """The pod object is gone from the API (force-deleted): stop at once."""
        self._gone = True
        self._wake.set()

    def shutdown(self, grace: float) -> None:
        """The agent is stopping: stop the containers, leave the API object alone."""
        self._shutdown_grace = grace
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------
    @property
    def pod(self) -> dict:
        with self._lock:
            return self._pod

    def run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("pod worker %s crashed", self.name)
            self._stop_all(2.0)
            self._release()
        finally:
            self._on_exit(self.uid)

    def _loop(self) -> None:
        while True:
            pod = self.pod
            if self._shutdown_grace is not None:
                self._stop_all(self._shutdown_grace)
                self._release()
                return
            if self._gone or pod["metadata"].get("deletionTimestamp"):
                self._terminate(pod)
                return
            if self._prepare(pod):
                self._refresh_volumes(pod)
                if self._run_init(pod):
                    for c in self.containers:
                        self._drive(pod, c)
                    self._probe(pod)
            st = self._publish(pod)
            if st and st["phase"] in ("Succeeded", "Failed") and self.netns:
                self._release()
            self._wake.wait(TICK)
            self._wake.clear()

    # -- sandbox and volumes ------------------------------------------------------------------
    def _prepare(self, pod: dict) -> bool:
        try:
            if self.ip is None:
                if self.host_network:
                    self.ip = self.node.internal_ip
                else:
                    self.ip = self.rt.pools[self.node.name].allocate(self.uid, (pod.get("status") or {}).get("podIP"))
                    self.netns = network.create_pod_netns(self.rt.settings.network, self.uid, self.ip)
            if self.volume_paths is None:
                (self.dir / "volumes").mkdir(parents=True, exist_ok=True)
                self.volume_paths = volumes.materialize(
                    pod, self.dir / "volumes", self._fetch,
                    lambda sa, aud, secs: self.rt.token(pod, sa, aud, secs), self.rt.claim_path,
                )
            self.message = None
            return True
        except (volumes.VolumeError, network.NetworkError, ApiException, RuntimeError) as exc:
            self.message = str(exc)
            for c in self.init + self.containers:
                c.waiting = ("ContainerCreating", self.message)
            self._event(pod, "Warning", "FailedMount", self.message)
            time.sleep(1)
            return False

    def _refresh_volumes(self, pod: dict) -> None:
        if time.monotonic() < self._next_refresh:
            return
        self._next_refresh = time.monotonic() + VOLUME_REFRESH
        try:
            volumes.refresh(pod, self.dir / "volumes", self._fetch)
        except ApiException as exc:
            log.debug("volume refresh of %s: %s", self.name, exc.reason)

    def _fetch(self, kind: str, ns: str, name: str) -> dict[str, bytes] | None:
        obj = self.rt.read_object(kind, ns, name)
        if obj is None:
            return None
        return volumes.configmap_bytes(obj) if kind == "configmap" else volumes.secret_bytes(obj)

    def _lookup(self, kind: str, ns: str, name: str) -> dict[str, str] | None:
        obj = self.rt.read_object(kind, ns, name)
        if obj is None:
            return None
        return dict(obj.get("data") or {}) if kind == "configmap" else envmod.decode_secret(obj.get("data"))

    # -- containers ---------------------------------------------------------------------------
    def _prefix(self) -> list[str]:
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if self.host_network:
            return [*unshare, self.rt.settings.python, "-I", "-S", str(self.rt.launcher)]
        assert self.netns
        return ["ip", "netns", "exec", self.netns, *unshare, "--uts",
                self.rt.settings.python, "-I", "-S", str(self.rt.launcher)]

    def _start(self, pod: dict, c: Container) -> None:
        bin_dir, why_not = image_bin(c.image)
        if bin_dir is None:
            c.waiting = ("ErrImagePull", why_not)
            self._event(pod, "Warning", "Failed", f'Failed to pull image "{c.image}": {c.waiting[1]}')
            return
        status_now = dict(pod.get("status") or {}, podIP=self.ip, hostIP=self.node.internal_ip,
                          podIPs=[{"ip": self.ip}], hostIPs=[{"ip": self.node.internal_ip}])
        view = dict(pod, status=status_now)
        try:
            base = self.rt.base_env(pod)
            base["PATH"] = f"{bin_dir}:{base['PATH']}"  # the image's programs come first
            env = envmod.build(view, c.spec, base, self._lookup)
            mounts = volumes.mounts(c.spec, self.volume_paths or {}) + self._hosts_mount(pod)
        except (envmod.EnvError, volumes.VolumeError) as exc:
            c.waiting = ("CreateContainerConfigError", str(exc))
            self._event(pod, "Warning", "Failed", f"Error: {exc}")
            return
        command = c.spec.get("command") or ["modelfleet"]  # the project image's entrypoint
        argv = [envmod.expand(a, env) for a in [*command, *(c.spec.get("args") or [])]]
        cwd = c.spec.get("workingDir") or str(self.dir)
        logs = self.rt.settings.logs / "pods"
        c.launch(argv, env, cwd, mounts, pod["metadata"]["name"], self._prefix(),
                 self.dir / f"{c.name}.json", logs / f"{pod['metadata']['namespace']}_{pod['metadata']['name']}_{c.name}.log")
        self._event(pod, "Normal", "Started", f"Started container {c.name}", once=False)

    def _drive(self, pod: dict, c: Container) -> None:
        """Advance one container: notice exits, apply restartPolicy with back-off, start."""
        ended = c.poll()
        if ended is not None:
            self._after_exit(pod, c, ended)
        if c.running or c.terminated is not None or time.monotonic() < c.next_start:
            return
        if c.waiting and c.waiting[0] == "ErrImagePull":
            return
        self._start(pod, c)

    def _after_exit(self, pod: dict, c: Container, ended: Terminated) -> None:
        policy = pod["spec"].get("restartPolicy", "Always")
        if c.init and policy == "Always":
            policy = "OnFailure"  # init containers run to completion
        if policy == "Always" or (policy == "OnFailure" and ended.exit_code != 0):
            delay = c.backoff(self.rt.backoff_base, self.rt.backoff_cap)
            c.last = ended
            c.next_start = time.monotonic() + delay
            c.waiting = ("CrashLoopBackOff", f"back-off {delay:.0f}s restarting failed container={c.name} "
                         f"pod={pod['metadata']['name']}")
            if delay:
                self._event(pod, "Warning", "BackOff", "Back-off restarting failed container", once=False)
        else:
            c.terminated = ended

    def _run_init(self, pod: dict) -> bool:
        """Run init containers one after another; True once all completed."""
        for c in self.init:
            if c.terminated is not None and c.terminated.exit_code == 0:
                continue
            self._drive(pod, c)
            return False
        return True

    def _init_failed(self) -> bool:
        return any(c.terminated is not None and c.terminated.exit_code != 0 for c in self.init)

    def _hosts_mount(self, pod: dict) -> list[volumes.Mount]:
        """The kubelet-managed /etc/hosts (the pod's own name resolves to its IP) and
        /etc/resolv.conf (cluster DNS, which answers only for cluster names)."""
        if self.host_network:
            return []
        name = pod["metadata"]["name"]
        hosts = self.dir / "etc-hosts"
        extra = "".join(f"{a['ip']}\t{' '.join(a.get('hostnames') or [])}\n" for a in pod["spec"].get("hostAliases") or [])
        hosts.write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{self.ip}\t{name}\n{extra}")
        mounts = [volumes.Mount(str(hosts), "/etc/hosts", True)]
        if pod["spec"].get("dnsPolicy", "ClusterFirst") != "Default":
            ns = pod["metadata"]["namespace"]
            resolv = self.dir / "resolv.conf"
            resolv.write_text(f"nameserver {self.rt.settings.network.service_host}\n"
                              f"search {ns}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n")
            mounts.append(volumes.Mount(str(resolv), "/etc/resolv.conf", True))
        return mounts

    def _pre_stop(self, c: Container, budget: float) -> None:
        """Run the container's preStop hook (exec, httpGet or sleep) within `budget` seconds."""
        hook = ((c.spec.get("lifecycle") or {}).get("preStop")) or {}
        if not hook or not c.running or budget <= 0:
            return
        if "sleep" in hook:
            time.sleep(min(budget, float(hook["sleep"].get("seconds") or 0)))
        elif "exec" in hook:
            self._exec_probe(c)(list(hook["exec"].get("command") or []), budget)
        elif "httpGet" in hook:
            probes.check({"httpGet": hook["httpGet"], "timeoutSeconds": budget}, c.spec, self.ip or "", self._exec_probe(c))

    # -- probes -------------------------------------------------------------------------------
    def _exec_probe(self, c: Container) -> Callable[[list[str], float], int]:
        def run(cmd: list[str], timeout: float) -> int:
            if not c.spec_file:
                return 1
            try:
                return subprocess.run([*self._prefix(), str(c.spec_file), *cmd], capture_output=True,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                return 1
        return run

    def _probe(self, pod: dict) -> None:
        t = time.monotonic()
        for c in self.containers:
            if not c.running:
                continue
            order = [c.startup] if not c.startup.result else [c.liveness, c.readiness]
            for prober in order:
                if not prober.due(t):
                    continue
                ok = probes.check(prober.spec or {}, c.spec, self.ip or "", self._exec_probe(c))
                prober.record(ok, time.monotonic())
                if not ok:
                    self._event(pod, "Warning", "Unhealthy", f"{prober.kind.capitalize()} probe failed", once=False)
                failed_out = (prober.kind == "liveness" and not prober.result) or (
                    prober.kind == "startup" and prober.failures >= int((prober.spec or {}).get("failureThreshold") or 3))
                if failed_out:
                    self._event(pod, "Normal", "Killing",
                                f"Container {c.name} failed {prober.kind} probe, will be restarted", once=False)
                    ended = c.stop(float(pod["spec"].get("terminationGracePeriodSeconds") or 30))
                    if ended:
                        self._after_exit(pod, c, ended)
                    break

    # -- status -------------------------------------------------------------------------------
    def _publish(self, pod: dict) -> dict | None:
        facts = status.PodFacts(
            pod_ip=self.ip, host_ip=self.node.internal_ip, start_time=self.start_time,
            sandbox_ready=self.ip is not None, init_done=all(
                c.terminated is not None and c.terminated.exit_code == 0 for c in self.init),
            init_failed=self._init_failed(), message=self.message,
        )
        st = status.pod_status(pod, facts, self.init, self.containers)
        comparable = _without_times(st)
        if comparable == self.published:
            return st
        meta = pod["metadata"]
        try:
            call(self.rt.core.patch_namespaced_pod_status, meta["name"], meta["namespace"], {"status": st})
            self.published = comparable
        except ApiException as exc:
            if exc.status != 404:
                log.warning("status of %s: %s", self.name, exc.reason)
        return st

    def _event(self, pod: dict, kind: str, reason: str, message: str, once: bool = True) -> None:
        if once and (reason, message) in self.events_sent:
            return
        self.events_sent.add((reason, message))
        self.rt.event(pod, kind, reason, message)

    # -- termination --------------------------------------------------------------------------
    def _stop_all(self, grace: float, hooks: bool = False) -> None:
        """Stop every running container in parallel; with `hooks`, each runs its preStop
        hook first, and the hook's time counts against the grace period, as in the kubelet."""
        deadline = time.monotonic() + grace

        def stop(c: Container) -> None:
            if hooks:
                self._pre_stop(c, deadline - time.monotonic())
            c.stop(max(0.5, deadline - time.monotonic()))

        running = [c for c in self.init + self.containers if c.running]
        threads = [threading.Thread(target=stop, args=(c,)) for c in running]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _release(self) -> None:
        if self.netns:
            network.delete_pod_netns(self.rt.settings.network, self.uid)
            self.netns = None
        self.rt.pools[self.node.name].release(self.uid)

    def _terminate(self, pod: dict) -> None:
        """SIGTERM, the grace period, SIGKILL; then free the sandbox and finalize the delete."""
        meta = pod["metadata"]
        grace = 0.0 if self._gone else float(
            meta.get("deletionGracePeriodSeconds", pod["spec"].get("terminationGracePeriodSeconds", 30)) or 0)
        if any(c.running for c in self.containers):
            self._event(pod, "Normal", "Killing", "Stopping container(s)")
        self._stop_all(max(grace, 0.5), hooks=not self._gone)
        self._release()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._gone:
            return
        try:
            # With a body the API server ignores query parameters: the grace period goes in it.
            call(self.rt.core.delete_namespaced_pod, meta["name"], meta["namespace"],
                 body={"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}})
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("finalizing delete of %s: %s", self.name, exc.reason)


def _without_times(st: dict) -> dict:
    """Status minus transition timestamps, to patch only on real change."""
    out = dict(st)
    out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in st["conditions"]]
    return out

