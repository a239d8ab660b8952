"""A vLLM replica traces as the operator renders it: vLLM's OpenAI server (the CPU build from
`make vllm`) started with the command line and environment that `vllm_tracing` gives for an
OTLP endpoint, exporting to a loopback OTLP/HTTP receiver, continues the caller's trace.

vLLM takes one to two minutes to start here. Without the vLLM environment this skips, unless
MODELFLEET_REQUIRE_VLLM is set, when it fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from modelfleet.demo import VLLM_DEMO_SPEC, ensure_demo_model
from modelfleet.devcluster import stop_group, wait_for
from modelfleet.engines import VLLM_SERVER_MODULE, VllmServer, find_vllm_python, vllm_env, vllm_tracing
from modelfleet.netutil import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/otlp_receiver.py
from otlp_receiver import otlp_receiver  # noqa: E402

from .conftest import require_vllm  # noqa: E402

pytestmark = pytest.mark.integration
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

require_vllm()


@pytest.fixture
def receiver():
    with otlp_receiver() as receiver:
        yield receiver


def test_a_vllm_replica_continues_the_callers_trace(receiver, tmp_path):
    endpoint, tracing_env = vllm_tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    port = free_port()
    server = VllmServer(model=str(ensure_demo_model(VLLM_DEMO_SPEC)), served_names=["tiny"], host="127.0.0.1",
                        port=port, max_num_seqs=4, otlp_traces_endpoint=endpoint)
    env = {**os.environ, **vllm_env(gpu=False, kv_cache_gib=1), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
           **tracing_env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "vllm.log"
    # -P and a cwd of its own: never import from a checkout (its operator/ would shadow the stdlib's).
    proc = subprocess.Popen([find_vllm_python(), "-P", "-m", VLLM_SERVER_MODULE, *server.args()], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 600, "vLLM to start", interval=1.0)
        r = httpx.post(url + "/v1/chat/completions", timeout=120,
                       headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
                       json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200, r.text
        # vLLM's batch processor exports every few seconds.
        ((service, span),) = wait_for(lambda: receiver.spans("llm_request"), 60, "vLLM's request span")
        assert service == "vllm"
        assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
        attributes = {a.key: a.value for a in span.attributes}
        assert attributes["gen_ai.usage.completion_tokens"].int_value == r.json()["usage"]["completion_tokens"]
    finally:
        stop_group(proc, signal.SIGTERM, timeout=60)
