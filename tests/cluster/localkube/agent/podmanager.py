"""Routes pod watch events to one PodWorker per pod bound to our nodes."""

from __future__ import annotations

import logging
import threading

from .podworker import PodWorker
from .runtime import Runtime

log = logging.getLogger(__name__)


class PodManager:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._workers: dict[str, PodWorker] = {}
        self._lock = threading.Lock()
        self._closing = False

    def handle(self, kind: str, pod: dict) -> None:
        """Store handler: start, update or stop the pod's worker."""
        if pod["spec"].get("nodeName") not in self.rt.nodes:
            return
        uid = pod["metadata"]["uid"]
        with self._lock:
            worker = self._workers.get(uid)
            if kind == "DELETED":
                if worker:
                    worker.vanish()
                return
            if worker:
                worker.update(pod)
                return
            if self._closing or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return
            worker = PodWorker(self.rt, pod, self._forget)
            self._workers[uid] = worker
        log.info("starting pod %s", worker.name)
        worker.start()

    def _forget(self, uid: str) -> None:
        with self._lock:
            self._workers.pop(uid, None)

    def shutdown(self, grace: float) -> None:
        """Stop every pod's containers (the agent is going away) and wait for the workers."""
        with self._lock:
            self._closing = True
            workers = list(self._workers.values())
        for w in workers:
            w.shutdown(grace)
        for w in workers:
            w.join(grace + 5)
