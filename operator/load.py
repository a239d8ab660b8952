"""In-flight load of a model's workers, read from their Prometheus /metrics.

Workers export vLLM's gauge names (docs/engines.md), so the same reader works for
vLLM pods too. Parsing is pure; `probe_inflight` does the HTTP, and reconcile() receives it as
a plain callable so tests pass a fake.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from modelfleet.engines import inflight_from_metrics

log = logging.getLogger(__name__)

# (ready pods) -> total in-flight requests, or None when no pod could be asked.
LoadProbe = Callable[[Sequence[Mapping[str, Any]]], "int | None"]


def is_ready(pod: Mapping[str, Any]) -> bool:
    """A pod whose Ready condition is True (the same pods the EndpointSlices list)."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def make_http_probe(port: int, timeout: float) -> LoadProbe:
    """A LoadProbe that GETs http://<podIP>:<port>/metrics from each ready pod."""

    def probe(pods: Sequence[Mapping[str, Any]]) -> int | None:
        answers: list[int] = []
        with httpx.Client(timeout=httpx.Timeout(timeout)) as client:
            for pod in pods:
                ip = (pod.get("status") or {}).get("podIP")
                if not ip or not is_ready(pod):
                    continue
                host = f"[{ip}]" if ":" in ip else ip
                try:
                    resp = client.get(f"http://{host}:{port}/metrics")
                    resp.raise_for_status()
                except httpx.HTTPError as exc:
                    log.debug("metrics of %s: %s", ip, exc)
                    continue
                value = inflight_from_metrics(resp.text)
                if value is not None:
                    answers.append(value)
        return sum(answers) if answers else None

    return probe


def no_probe(pods: Sequence[Mapping[str, Any]]) -> int | None:
    """A LoadProbe for when scraping is off: load is always unknown."""
    return None
