"""Pure rendering of the Gateway API Inference Extension's InferencePool for one ModelDeployment.

With `OperatorConfig.endpoint_picker` set, each ModelDeployment also gets an InferencePool
(`inference.networking.k8s.io/v1`) of the same name, owned by it like its Service: an
Inference Extension gateway (Envoy plus the endpoint picker, EPP) then routes to the worker
pods of either engine. The pool selects exactly the pods the Service selects and targets the
worker port, where both engines serve the OpenAI API and `/metrics` under vLLM's names, which
the EPP scrapes. The EPP itself belongs to the user's gateway install: one EPP serves one pool
(its `--pool-name`), so the reference names a Service per ModelDeployment (`{name}` in the
configured name is replaced by the ModelDeployment's name).
"""

from __future__ import annotations

from typing import Any

from modelfleet import labels
from modelfleet.api import ModelDeployment

from .config import OperatorConfig
from .render import child_metadata

GROUP = "inference.networking.k8s.io"
API_VERSION = f"{GROUP}/v1"
KIND = "InferencePool"
# For kube.delete/get, as kube.py names the kinds it applies.
INFERENCE_POOL = (API_VERSION, KIND)


def render_inference_pool(md: ModelDeployment, config: OperatorConfig) -> dict[str, Any] | None:
    """The InferencePool routing to this ModelDeployment's workers; None when the setting is off.

    Its selector is the Service's (the Deployment's selector label), not the full worker
    label set, so pods of an older Deployment revision stay in the pool while they serve.
    """
    epp = config.endpoint_picker
    if epp is None:
        return None
    obj = child_metadata(md, API_VERSION, KIND)
    obj["spec"] = {
        "selector": {"matchLabels": labels.selector_labels(md.metadata.name)},
        "targetPorts": [{"number": config.worker_port}],
        "endpointPickerRef": {
            "kind": "Service",
            "name": epp.service_name(md.metadata.name),
            "port": {"number": epp.port},
        },
    }
    return obj
