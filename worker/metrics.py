"""Prometheus metrics of one worker, under vLLM's names so that KEDA triggers, the Gateway API
Inference Extension's model-server protocol and vLLM dashboards read them unchanged."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .engine import EngineStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


class EngineCollector(Collector):
    """Reads the engine's counters at scrape time, so the hot loop never touches Prometheus."""

    def __init__(self, stats: EngineStats | None, model: str, draining: callable) -> None:
        self.stats = stats
        self.model = model
        self.draining = draining
        self.started = time.time()

    def collect(self) -> Iterator:
        s = self.stats or EngineStats()
        labels = ["model_name"]
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests in the running batch.", s.running),
            ("vllm:num_requests_waiting", "Requests waiting to join the batch.", s.waiting),
            ("vllm:kv_cache_usage_perc", "KV held by running sequences over the KV budget, 1 = full.", s.kv_usage),
            ("vllm:gpu_cache_usage_perc", "KV held over the KV budget, 1 = full (older vLLM name).", s.kv_usage),
            ("modelfleet_worker_draining", "1 while the worker drains before exit.", 1.0 if self.draining() else 0.0),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model], value)
            yield g
        for name, doc, value in (
            ("vllm:prompt_tokens", "Prefilled prompt tokens.", s.prompt_tokens),
            ("vllm:generation_tokens", "Generated tokens.", s.generation_tokens),
            ("modelfleet_worker_decode_steps", "Decode steps run by the engine.", s.steps),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("vllm:prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache.", s.prefix_cache_hits),
            ("vllm:num_preemptions", "Requests preempted for KV room (recomputed later).", s.preemptions),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model], value)
            yield c
        # vLLM's LoRA gauge (its value: when the adapter sets last changed), with no adapters:
        # this engine serves none. The Inference Extension's endpoint picker reads it on every
        # scrape and logs a missing family as an error (it still uses the other gauges), and
        # skips a series whose two adapter lists are empty.
        lora = GaugeMetricFamily("vllm:lora_requests_info", "Running and waiting LoRA adapters.",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        lora.add_metric(["", "", "0"], self.started)
        yield lora


class WorkerMetrics:
    def __init__(self, model: str, stats: EngineStats | None, draining: callable) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        self.registry.register(EngineCollector(stats, model, draining))
        hist = {
            "time_to_first_token_seconds": "Time from arrival to the first generated token.",
            "inter_token_latency_seconds": "Time between consecutive tokens of one sequence.",
            "e2e_request_latency_seconds": "Time from arrival to the last token.",
            "prefill_seconds": "Duration of one batched prefill.",
            "decode_step_seconds": "Duration of one decode step of the whole batch.",
        }
        self.histograms = {
            key: Histogram(f"vllm:{key}", doc, ["model_name"], buckets=LATENCY_BUCKETS, registry=self.registry)
            for key, doc in hist.items()
        }

    def observe(self, name: str, value: float) -> None:
        hist = self.histograms.get(name)
        if hist is not None:
            hist.labels(self.model).observe(value)
