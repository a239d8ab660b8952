"""Kubernetes discovery: ModelDeployments and their EndpointSlices -> the registry.

ModelDeployments name the models (served name, aliases, routing) and are listed in /v1/models
even while scaled to zero; the EndpointSlices of the Services the operator creates (label
`modelfleet.dev/model`) say which pods are ready. A request for a model with no ready replica
that can scale from zero is held while the gateway patches the demand annotation on its
ModelDeployment, until a replica is ready or the hold times out (then 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from modelfleet import labels
from modelfleet.api import ModelDeployment, NameClaim, settle_names
from modelfleet.protocol import unavailable

from .balancer import RouteSettings
from .informer import Informer, Key, Store, wait_synced
from .registry import Registry

log = logging.getLogger(__name__)
DEMAND_INTERVAL = 5.0  # seconds between demand patches while requests wait


@dataclass
class ModelEntry:
    """What the gateway needs of one ModelDeployment."""

    namespace: str
    name: str
    served: str
    aliases: list[str]
    route: RouteSettings  # spec.routing as the balancer uses it, typed once here
    max_queue: int
    hold_timeout: float
    scale_from_zero: bool
    max_model_len: int | None
    created: int
    engine: str = "modelfleet"
    weight: int | None = None  # spec.routing.weight: its share when several serve the name
    adapters: list[str] = field(default_factory=list)  # spec.adapters' names (LoRA)
    stopped: bool = False  # spec.replicas 0 and no autoscaling: nothing will start
    failure: str | None = None  # status says its replicas cannot start, and why
    last_demand: float = 0.0


def model_entry(obj: dict[str, Any]) -> ModelEntry | None:
    """Pure: a ModelDeployment object -> its routing entry (None if it cannot be parsed)."""
    try:
        md = ModelDeployment.from_body(obj)
    except ValueError as exc:
        log.warning("ignoring ModelDeployment %s: %s", obj.get("metadata", {}).get("name"), exc)
        return None
    created = obj.get("metadata", {}).get("creationTimestamp")
    stamp = int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()) if created else 0
    autoscaling = md.spec.autoscaling
    failed = md.status.phase == "Failed"
    ready = md.status.condition("Ready")
    return ModelEntry(
        namespace=md.metadata.namespace, name=md.metadata.name, served=md.served_name,
        aliases=list(md.spec.model.aliases), route=RouteSettings.of(md.spec.routing),
        max_queue=md.spec.routing.max_queue, hold_timeout=float(md.spec.routing.hold_timeout_seconds),
        scale_from_zero=autoscaling is not None and autoscaling.min_replicas == 0,
        max_model_len=md.spec.engine.max_model_len, created=stamp, engine=md.spec.engine.kind,
        weight=md.spec.routing.weight, adapters=[a.name for a in md.spec.adapters],
        stopped=autoscaling is None and md.spec.replicas == 0,
        failure=(ready.message if ready is not None and ready.message else "its replicas failed") if failed else None,
    )


def slice_owner(obj: dict[str, Any]) -> tuple[str, str] | None:
    meta = obj.get("metadata", {})
    name = (meta.get("labels") or {}).get(labels.MODEL)
    return (meta.get("namespace", "default"), name) if name else None


def _http_port(obj: dict[str, Any]) -> int | None:
    """An EndpointSlice's port named http, else its first."""
    ports = obj.get("ports") or []
    return next((p.get("port") for p in ports if p.get("name") == "http"), None) or (
        ports[0].get("port") if ports else None)


def _url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"


def ready_urls(obj: dict[str, Any]) -> list[str]:
    """Pure: the URLs of an EndpointSlice's ready endpoints (port named http, else the first)."""
    port = _http_port(obj)
    if not port:
        return []
    return sorted(_url(address, port) for ep in obj.get("endpoints") or []
                  if (ep.get("conditions") or {}).get("ready") is not False
                  for address in ep.get("addresses") or [])


def failing_urls(obj: dict[str, Any]) -> list[str]:
    """Pure: the URLs of an EndpointSlice's endpoints that are unready while not terminating:
    a failing readiness probe, not a pod draining for its exit."""
    port = _http_port(obj)
    if not port:
        return []
    return sorted(_url(address, port) for ep in obj.get("endpoints") or []
                  if (ep.get("conditions") or {}).get("ready") is False
                  and not (ep.get("conditions") or {}).get("terminating")
                  for address in ep.get("addresses") or [])


class KubernetesDiscovery:
    def __init__(self, registry: Registry, namespaces: list[str] | None = None, api_client: Any = None,
                 extra_sources: list | None = None) -> None:
        self.registry = registry
        self.namespaces = namespaces or []
        self.api_client = api_client
        self.extra_sources = extra_sources or []  # other watched state: API-key Secrets, gateway peers
        self.models = Store(self._on_models)  # ModelDeployments
        self.slices = Store(self._on_slices)  # their EndpointSlices
        self.entries: dict[Key, ModelEntry] = {}
        self.slice_urls: dict[Key, tuple[Key, list[str]]] = {}  # slice -> (its ModelDeployment, ready URLs)
        self.informers: list[Informer] = []
        self.synced = False
        # Served name -> the ModelDeployments serving it, oldest first (several when weighted).
        self.serving: dict[str, list[ModelEntry]] = {}
        self._refused: set[Key] = set()  # name clashes already logged

    # -- store changes (on the event loop) ------------------------------------------------------

    def _on_models(self, keys: set[Key]) -> None:
        for key in keys:
            obj = self.models.objects.get(key)
            entry = model_entry(obj) if obj is not None else None
            if obj is None:
                self.entries.pop(key, None)
            elif entry is not None:  # one that cannot be parsed keeps what it had
                old = self.entries.get(key)
                if old is not None:  # keep the demand clock across updates
                    entry.last_demand = old.last_demand
                self.entries[key] = entry
        self._rebuild()

    def _on_slices(self, keys: set[Key]) -> None:
        for key in keys:
            obj = self.slices.objects.get(key)
            owner = slice_owner(obj) if obj is not None else None
            if owner is None:
                self.slice_urls.pop(key, None)
                continue
            self.slice_urls[key] = (owner, ready_urls(obj))
            for url in failing_urls(obj):
                endpoint = self.registry.endpoints.get(url)
                if endpoint is not None:
                    endpoint.mark_lost()
        self._rebuild()

    def _rebuild(self) -> None:
        """Level-based: derive the registry's model set from the two stores, whole."""
        urls: dict[tuple[str, str], list[str]] = {}
        for owner, slice_urls in self.slice_urls.values():
            urls.setdefault(owner, []).extend(slice_urls)
        served = self._settle()
        for model, members in served.items():
            groups = {url: (f"{e.namespace}/{e.name}", e.weight) for e in members
                      for url in urls.get((e.namespace, e.name), [])}
            names = list(dict.fromkeys(n for e in members for n in (e.served, *e.aliases)))
            self.registry.set_endpoints(model, sorted(groups), names, ready=True, groups=groups)
            self.registry.set_adapters(model, list(dict.fromkeys(a for e in members for a in e.adapters)))
            first = members[0]  # the oldest: its routing settings and card apply to the name
            self.registry.meta[model] = {"created": first.created, "max_model_len": first.max_model_len,
                                         "engine": first.engine}
            self.registry.set_route(model, first.route)
        self.serving = served
        for model in set(self.registry.models()) - set(served):
            self.registry.remove_model(model)
        self.registry.notify()

    def _settle(self) -> dict[str, list[ModelEntry]]:
        """Served name -> its ModelDeployments, settled as the operator does (modelfleet.api.
        settle_names): the oldest keeps a name; a newer one shares it only when both set
        spec.routing.weight, and is otherwise left out (its status says NameConflict)."""
        claims = [NameClaim(e.namespace, e.name, e.served, tuple(e.aliases), e.weight, e.created, tuple(e.adapters))
                  for e in self.entries.values()]
        settled = settle_names(claims)
        served: dict[str, list[ModelEntry]] = {}
        for claim in sorted(claims, key=lambda c: (c.created, c.namespace, c.name)):
            holder = settled[claim.key]
            if holder is None:
                served.setdefault(claim.served, []).append(self.entries[claim.key])
            elif claim.key not in self._refused:
                log.warning("model name %s of %s/%s is served by %s/%s; not routing to it (NameConflict)",
                            claim.served, *claim.key, *holder.key)
        self._refused = {key for key, holder in settled.items() if holder is not None}
        return served

    def entry_for(self, model: str) -> ModelEntry | None:
        """The oldest ModelDeployment serving `model` (its routing settings apply)."""
        members = self.serving.get(model)
        return members[0] if members else None

    # -- the app's side ------------------------------------------------------------------------

    async def start(self) -> None:
        from kubernetes import client

        from modelfleet import kubeconfig
        from modelfleet.api import GROUP, PLURAL, VERSION

        self.api_client = self.api_client or kubeconfig.api_client()
        loop = asyncio.get_running_loop()
        custom = client.CustomObjectsApi(self.api_client)
        discovery_api = client.DiscoveryV1Api(self.api_client)
        selector = labels.MODEL
        if self.namespaces:
            for ns in self.namespaces:
                self.informers.append(Informer(f"md/{ns}", self.models, custom.list_namespaced_custom_object, loop,
                                               group=GROUP, version=VERSION, namespace=ns, plural=PLURAL))
                self.informers.append(Informer(f"slices/{ns}", self.slices, discovery_api.list_namespaced_endpoint_slice,
                                               loop, namespace=ns, label_selector=selector))
        else:
            self.informers.append(Informer("md", self.models, custom.list_cluster_custom_object, loop,
                                           group=GROUP, version=VERSION, plural=PLURAL))
            self.informers.append(Informer("slices", self.slices, discovery_api.list_endpoint_slice_for_all_namespaces,
                                           loop, label_selector=selector))
        self.informers += [source.informer(self.api_client, loop) for source in self.extra_sources]
        for informer in self.informers:
            informer.start()
        self.synced = await asyncio.to_thread(wait_synced, self.informers, 30.0)
        await asyncio.sleep(0)  # let the SYNC events queued by the threads run
        if not self.synced:
            log.warning("discovery has not synced yet; serving what is known")

    async def stop(self) -> None:
        for informer in self.informers:
            informer.stop()

    def ready(self) -> bool:
        return all(i.synced.is_set() for i in self.informers)

    async def wait_for(self, model: str, adapter: str | None = None) -> None:
        """Holds a request while its model's replicas start, or scale up from zero (then the
        demand annotation asks the operator for one), up to spec.routing.holdTimeoutSeconds;
        503 at once when nothing will start: a model scaled to zero by hand, or one whose
        replicas are failing (with the reason from its status). A LoRA adapter's request is
        held the same way until a replica holds the adapter (the operator is loading it)."""
        if self.registry.available(model, adapter):
            return
        entry = self.entry_for(model)
        if entry is None:
            raise unavailable(f"No ready replica for model `{model}`.", retry_after=5)
        members = self.serving.get(model, [entry])
        if all(e.failure is not None for e in members):
            raise unavailable(f"Model `{model}` cannot start: {entry.failure}", retry_after=30)
        if all(e.stopped for e in members):
            raise unavailable(f"Model `{model}` is scaled to zero replicas.", retry_after=30)
        # Every version that can scale from zero is asked to: the weighted split needs each one.
        waking = [e for e in members if e.scale_from_zero]

        async def on_wait() -> None:
            for e in waking:
                await self._signal_demand(e, model)

        await self.registry.hold(model, entry.hold_timeout, entry.max_queue, on_wait if waking else None,
                                 tick=DEMAND_INTERVAL, adapter=adapter)

    async def _signal_demand(self, entry: ModelEntry, model: str) -> None:
        now = time.monotonic()
        if now - entry.last_demand < DEMAND_INTERVAL:
            return
        entry.last_demand = now
        from .kube import patch_annotation

        waiting = self.registry.waiting.get(model, 0)
        value = labels.Demand(datetime.now(UTC), waiting).encode()
        try:
            await asyncio.to_thread(patch_annotation, self.api_client, entry.namespace, entry.name, labels.DEMAND,
                                    value)
            log.info("signalled demand", extra={"model": entry.served, "waiting": waiting})
        except Exception as exc:  # noqa: BLE001 - RBAC or API trouble must not fail the held request
            log.warning("could not signal demand for %s: %s", entry.served, exc)
