"""Label and annotation keys: the operator and the gateway write them, the gateway reads them.

Kept in one module so that a rename cannot leave one side behind. Labels hold what selectors
need (label values are limited to 63 characters of [A-Za-z0-9._-]); annotations hold what a
label cannot (served names may contain "/" and ":").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from modelfleet.api import GROUP

PREFIX = GROUP

# On every object the operator renders (Deployment, its Pods, Service, PDB) and copied by the
# EndpointSlice controller from the Service to its EndpointSlices. Value: the ModelDeployment's
# metadata.name. The Deployment's selector is this label alone.
MODEL = f"{PREFIX}/model"

# Scale-from-zero demand signal: the gateway patches this annotation on the ModelDeployment
# when it holds requests for a model with no ready replica. Value: JSON
# {"time": "<RFC 3339 UTC>", "waiting": <int>}; see docs/operator.md.
DEMAND = f"{PREFIX}/demand"

# Label on Secrets that hold API keys (docs/keys.md); value "true".
API_KEY = f"{PREFIX}/api-key"

# Labels on the Secrets that hold stored Responses (gateway/responses_store.py): the marker
# ("true"), a digest naming the key that may read it, and its expiry in unix seconds.
RESPONSE = f"{PREFIX}/response"
RESPONSE_OWNER = f"{PREFIX}/response-owner"
RESPONSE_EXPIRES = f"{PREFIX}/response-expires"
# Annotation on the same Secrets: the response id (Secret names are a hash of it).
RESPONSE_ID = f"{PREFIX}/response-id"

# The weight cache (operator/cache.py, docs/operator.md "Weight cache"). CACHE: label on the
# claims the operator makes and on their fill Jobs; value: the cache's digest, which also names
# them. CACHE_SOURCE: annotation on both, the spec.model.source they hold. CACHE_FILLED: prefix
# of the annotation a filled claim carries per model directory (the directory's name follows),
# value JSON {"bytes": <int>, "time": "<RFC 3339 UTC>"}, so a claim shared by several sources
# records each. CACHE_KEEP: label ("true") on a claim that outlives its last user.
CACHE = f"{PREFIX}/cache"
CACHE_SOURCE = f"{PREFIX}/cache-source"
CACHE_FILLED = f"filled.{PREFIX}/"
CACHE_KEEP = f"{PREFIX}/cache-keep"
COMPONENT_CACHE = "cache"

# Prefix for kopf's own bookkeeping annotations (progress, last-handled configuration). A
# subdomain of ours rather than PREFIX itself: kopf leaves every annotation under its storage
# prefix out of the diff it reacts to, and DEMAND must stay in it so a demand signal triggers
# a reconcile at once.
KOPF_PREFIX = f"kopf.{PREFIX}"

# Field manager for server-side apply: one owner for every field the operator sets.
FIELD_MANAGER = "modelfleet-operator"

# Well-known labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/).
APP_NAME = "app.kubernetes.io/name"
APP_INSTANCE = "app.kubernetes.io/instance"
APP_COMPONENT = "app.kubernetes.io/component"
APP_PART_OF = "app.kubernetes.io/part-of"
APP_MANAGED_BY = "app.kubernetes.io/managed-by"

APP_NAME_WORKER = "modelfleet-worker"
COMPONENT_WORKER = "worker"
PART_OF = "modelfleet"
MANAGED_BY = FIELD_MANAGER


def selector_labels(md_name: str) -> dict[str, str]:
    """The Deployment's (immutable) selector: one label, so that it never has to change."""
    return {MODEL: md_name}


def worker_labels(md_name: str) -> dict[str, str]:
    """Labels on every object rendered for one ModelDeployment."""
    return {
        **selector_labels(md_name),
        APP_NAME: APP_NAME_WORKER,
        APP_INSTANCE: md_name,
        APP_COMPONENT: COMPONENT_WORKER,
        APP_PART_OF: PART_OF,
        APP_MANAGED_BY: MANAGED_BY,
    }


def selector_string(labels: Mapping[str, str]) -> str:
    """A label selector in the string form the scale subresource reports (k=v,k2=v2)."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


@dataclass(frozen=True)
class Demand:
    """The value of the DEMAND annotation: requests waiting at the gateway at `time`."""

    time: datetime
    waiting: int

    def encode(self) -> str:
        """The annotation value the gateway writes. The stamp keeps milliseconds: the operator
        counts the hold from it, and whole seconds would start that up to a second early."""
        stamp = self.time.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return json.dumps({"time": stamp, "waiting": int(self.waiting)}, separators=(",", ":"))


def parse_demand(value: str | None) -> Demand | None:
    """Read the DEMAND annotation; None for absent or malformed values (never raises).

    Lenient because anyone with patch rights can write an annotation, and a bad one must not
    stop the operator from reconciling.
    """
    if not value:
        return None
    try:
        data = json.loads(value)
        stamp = datetime.fromisoformat(str(data["time"]).replace("Z", "+00:00"))
        waiting = int(data.get("waiting", 1))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return Demand(time=stamp, waiting=max(waiting, 0))
