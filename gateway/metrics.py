"""Prometheus metrics of the gateway, in a registry of its own (no process-global state)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .registry import Registry

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class RegistryCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator:
        inflight = GaugeMetricFamily("modelfleet_gateway_backend_inflight", "Requests in flight per backend.",
                                     labels=["model", "backend"])
        ready = GaugeMetricFamily("modelfleet_gateway_backend_available", "1 if the backend takes traffic.",
                                  labels=["model", "backend"])
        for e in self.registry.endpoints.values():
            inflight.add_metric([e.model, e.url], e.inflight)
            ready.add_metric([e.model, e.url], 1.0 if e.available() else 0.0)
        yield inflight
        yield ready


class GatewayMetrics:
    def __init__(self, registry: Registry) -> None:
        self.prom = CollectorRegistry()
        self.prom.register(RegistryCollector(registry))
        self.requests = Counter("modelfleet_gateway_requests", "Requests by model, status and key name.",
                                ["model", "status", "key"], registry=self.prom)
        self.tokens = Counter("modelfleet_gateway_tokens", "Prompt + completion tokens by model and key name.",
                              ["model", "key"], registry=self.prom)
        self.latency = Histogram("modelfleet_gateway_request_seconds", "Time until the response ended.",
                                 ["model"], buckets=BUCKETS, registry=self.prom)
        self.first_byte = Histogram("modelfleet_gateway_first_byte_seconds", "Time until the backend answered.",
                                    ["model"], buckets=BUCKETS, registry=self.prom)
        self.first_token = Histogram("modelfleet_gateway_time_to_first_token_seconds",
                                     "Streams: from the request reaching the gateway to its first event.",
                                     ["model"], buckets=BUCKETS, registry=self.prom)
        self.inter_token = Histogram("modelfleet_gateway_inter_token_latency_seconds",
                                     "Streams: mean time between events, one observation per stream.",
                                     ["model"], buckets=ITL_BUCKETS, registry=self.prom)
        self.queue_wait = Histogram("modelfleet_gateway_queue_wait_seconds",
                                    "Time a request was held waiting for a model to have a ready replica.",
                                    ["model"], buckets=BUCKETS, registry=self.prom)
        # Per version of a model: how a weighted split (spec.routing.weight) actually went.
        self.routed = Counter("modelfleet_gateway_routed_requests", "Requests a backend answered, by model and "
                              "ModelDeployment (namespace/name; empty under static discovery).",
                              ["model", "deployment"], registry=self.prom)
        self.retries = Counter("modelfleet_gateway_retries", "Attempts on another backend.", ["model"],
                               registry=self.prom)
        self.ejections = Counter("modelfleet_gateway_ejections", "Backends ejected after failures.", ["model"],
                                 registry=self.prom)
