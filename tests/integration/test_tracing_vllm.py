"""A vLLM replica traces as the operator renders it: vLLM's OpenAI server (the CPU build from
`make vllm`), started with the command line and environment that `vllm_tracing` gives for an
OTLP endpoint (the tier's shared `vllm_direct` server), exports to a loopback OTLP/HTTP
receiver and continues the caller's trace.

Without the vLLM environment this skips, unless MODELFLEET_REQUIRE_VLLM is set, when it fails.
"""

from __future__ import annotations

import httpx
import pytest

from modelfleet.devcluster import wait_for

from .conftest import require_vllm

pytestmark = pytest.mark.integration
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

require_vllm()


def test_a_vllm_replica_continues_the_callers_trace(vllm_direct):
    r = httpx.post(vllm_direct.url + "/v1/chat/completions", timeout=120,
                   headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
                   json={"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text

    def ours() -> list:  # the server is shared: other tests' requests export spans of their own
        return [(service, span) for service, span in vllm_direct.receiver.spans("llm_request")
                if span.trace_id.hex() == TRACE_ID]

    # vLLM's batch processor exports every few seconds.
    ((service, span),) = wait_for(ours, 60, "vLLM's request span")
    assert service == "vllm"
    assert span.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["gen_ai.usage.completion_tokens"].int_value == r.json()["usage"]["completion_tokens"]
