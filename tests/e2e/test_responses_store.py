"""Stored Responses shared by gateway replicas on the local cluster: two gateway processes with
Kubernetes discovery keep responses as Secrets in their namespace, so a conversation stored
through one continues, reads and is deleted through the other, for its key only. Runs on both
node kinds (on the real node the worker runs from the worker image: operator_harness.worker_args)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # operator_harness, beside this file

from operator_harness import GatewayProcess, demo_model_source, model_deployment, operator_namespace  # noqa: E402

from modelfleet.devcluster import wait_for  # noqa: E402

pytestmark = pytest.mark.e2e
ADA, BOB = "sk-ada-responses-0123", "sk-bob-responses-0123"
MODEL = "tiny-chat-responses"
# Memory is a limit on the real node: room for torch.
LOADING = {"cpu": "100m", "memory": "2Gi"}


def ready(url: str) -> bool:
    try:
        return MODEL in httpx.get(url + "/ready", timeout=2).json().get("models", [])
    except (httpx.HTTPError, ValueError):
        return False


@pytest.fixture(scope="module")
def gateways(cluster, tmp_path_factory):
    """The operator, one tiny model, and two gateways sharing one namespace's Secrets."""
    logs = tmp_path_factory.mktemp("responses-e2e")
    with demo_model_source() as source, operator_namespace(logs, name="resp-") as (namespace, _op):
        cluster.apply(*[{"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": name, "labels": {"modelfleet.dev/api-key": "true"}}, "stringData": {"key": key}}
            for name, key in (("ada", ADA), ("bob", BOB))], namespace=namespace)
        gws = [GatewayProcess(namespace, logs / f"gateway-{name}.log", "--key-namespace", namespace,
                              env={"POD_NAMESPACE": namespace})  # where the gateway keeps its Secrets
               for name in ("a", "b")]
        try:
            urls = [gw.start().url for gw in gws]
            cluster.apply(model_deployment("chat", source, replicas=1, resources=LOADING,
                                           model={"source": source, "servedName": MODEL}),
                          namespace=namespace)
            for url in urls:
                wait_for(lambda url=url: ready(url), 240, what=f"{url} routes to a ready replica")
            yield cluster, namespace, urls
        finally:
            for gw in gws:
                gw.stop()


def post(url: str, key: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/responses", headers={"authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": MODEL, "max_output_tokens": 8, **body})


def get(url: str, path: str, key: str) -> httpx.Response:
    return httpx.get(url + path, headers={"authorization": f"Bearer {key}"}, timeout=30)


def test_a_conversation_stored_through_one_gateway_continues_through_another(gateways):
    cluster, namespace, (a, b) = gateways
    first = post(a, ADA, input="My name is Ada.")
    assert first.status_code == 200, first.text
    one = first.json()
    assert one["store"] is True

    secrets = cluster.list("secrets", namespace, "modelfleet.dev/response=true")
    assert len(secrets) == 1 and secrets[0]["type"] == "modelfleet.dev/response"
    assert secrets[0]["metadata"]["annotations"]["modelfleet.dev/response-id"] == one["id"]
    assert "My name is Ada" not in json.dumps(secrets)  # gzipped, then base64: not readable at a glance

    second = post(b, ADA, input="What is my name?", previous_response_id=one["id"])
    assert second.status_code == 200, second.text
    two = second.json()
    assert two["previous_response_id"] == one["id"] and two["usage"]["input_tokens"] > one["usage"]["input_tokens"]
    items = get(b, f"/v1/responses/{two['id']}/input_items?order=asc", ADA).json()["data"]
    assert [i.get("role") for i in items] == ["user", "assistant", "user"]
    assert items[1]["content"] == one["output"][0]["content"]

    assert get(a, f"/v1/responses/{two['id']}", ADA).json() == two
    assert get(b, f"/v1/responses/{one['id']}", BOB).status_code == 404  # another key's
    assert post(a, BOB, input="x", previous_response_id=one["id"]).status_code == 404

    deleted = httpx.delete(f"{b}/v1/responses/{one['id']}", headers={"authorization": f"Bearer {ADA}"})
    assert deleted.json() == {"id": one["id"], "object": "response", "deleted": True}
    assert get(a, f"/v1/responses/{one['id']}", ADA).status_code == 404
    assert len(cluster.list("secrets", namespace, "modelfleet.dev/response=true")) == 1  # the second turn's


def test_a_streamed_response_stored_through_one_gateway_is_found_by_the_other(gateways):
    cluster, namespace, (a, b) = gateways
    with httpx.stream("POST", a + "/v1/responses", headers={"authorization": f"Bearer {ADA}"}, timeout=120,
                      json={"model": MODEL, "input": "Count to three.", "max_output_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    final = events[-1]
    assert final["type"] in ("response.completed", "response.incomplete") and final["response"]["store"] is True
    # Stored before the final event was sent: the other gateway finds it at once.
    assert get(b, f"/v1/responses/{final['response']['id']}", ADA).json() == final["response"]
    more = post(b, ADA, input="Again.", previous_response_id=final["response"]["id"])
    assert more.status_code == 200 and more.json()["previous_response_id"] == final["response"]["id"]
