"""The operator's Prometheus metrics, on a registry of their own (no process-wide default).

Reconciles, errors and durations per trigger (create, update, resume, timer, child), plus
children applied per resource kind and autoscaler moves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram


class OperatorMetrics:
    """Built once in main.py and passed to the handlers; tests build their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(
            "modelfleet_operator_reconciles",
            "Reconciles of ModelDeployments, by what triggered them and how they ended.",
            ["resource", "trigger", "result"],
            registry=self.registry,
        )
        self.errors = Counter(
            "modelfleet_operator_reconcile_errors",
            "Failed reconciles, by kind of failure (temporary: retried; permanent: user must act).",
            ["resource", "kind"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "modelfleet_operator_reconcile_duration_seconds",
            "Time one reconcile took, API calls included.",
            ["resource", "trigger"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.coalesced = Counter(
            "modelfleet_operator_reconciles_coalesced",
            "Triggers skipped because a reconcile of the same object was already waiting to run.",
            ["resource", "trigger"],
            registry=self.registry,
        )
        self.scaled = Counter(
            "modelfleet_operator_autoscaler_moves",
            "Times the autoscaler changed a ModelDeployment's desired replicas.",
            ["direction"],
            registry=self.registry,
        )

    @contextmanager
    def timed(self, trigger: str, resource: str = "modeldeployments") -> Iterator[None]:
        """Count and time one reconcile; the result label follows the exception, if any."""
        start = time.perf_counter()
        result = "ok"
        try:
            yield
        except BaseException as exc:
            result = type(exc).__name__
            raise
        finally:
            self.duration.labels(resource, trigger).observe(time.perf_counter() - start)
            self.reconciles.labels(resource, trigger, result).inc()
