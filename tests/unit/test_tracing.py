"""modelfleet/tracing.py: on only with an OTLP endpoint, and then exporting over OTLP/HTTP to a
collector (here a stand-in on loopback that decodes the protobuf the SDK sends); off, the
SDK is never even imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modelfleet.tracing import GATEWAY_SERVICE, Tracing, enabled, from_environment, track

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/otlp_receiver.py
from otlp_receiver import otlp_receiver  # noqa: E402


@pytest.mark.parametrize(("environ", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
])
def test_tracing_is_on_only_with_an_otlp_endpoint(environ, on):
    assert enabled(environ) is on
    assert (from_environment(GATEWAY_SERVICE, environ) is not None) is on


def test_tracking_an_engine_request_outside_a_traced_request_does_nothing():
    track(object())  # no traced request in this context: nothing is kept, nothing fails


@pytest.fixture
def collector():
    with otlp_receiver() as receiver:
        yield receiver


def test_spans_reach_an_otlp_http_collector_under_the_process_service_name(collector, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    tracing = from_environment(GATEWAY_SERVICE)
    assert isinstance(tracing, Tracing)
    headers: dict[str, str] = {}
    span = tracing.upstream("/v1/chat/completions", "http://10.0.0.7:8000", "least-load", 1, headers)
    span.end()
    assert tracing.flush(10_000)
    (request,) = collector.received
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == GATEWAY_SERVICE and resource["deployment.environment"] == "test"
    (exported,) = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert exported.name == "upstream"
    # the replica is told this span's context, as W3C traceparent
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", exported.trace_id.hex(), exported.span_id.hex())
    assert int(flags, 16) & 1  # sampled


def test_with_no_endpoint_the_gateway_never_loads_the_sdk():
    """Tracing off costs nothing: no SDK, no exporter, no spans (checked in a fresh process)."""
    code = textwrap.dedent("""
        import os, sys
        for name in [n for n in os.environ if n.startswith("OTEL_")]:
            del os.environ[name]
        from modelfleet.gateway.app import GatewaySettings, create_app
        app = create_app(GatewaySettings(backends={"m": ["http://127.0.0.1:9"]}))
        assert app.tracing is None and app.proxy.tracing is None
        loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter")))
        assert not loaded, loaded
    """)
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
