"""An OpenTelemetry collector's OTLP/HTTP trace receiver on loopback, for the tests that check
what a process exports (tests/unit/test_tracing.py, tests/integration/test_tracing_vllm.py):
POST /v1/traces with a protobuf ExportTraceServiceRequest, decoded as a collector decodes it.
Anything else is refused as a collector refuses it (404 for another path, 415 for another
content type), so an exporter that sends the wrong thing shows up as nothing received.

Imported by those tests through `sys.path` (pytest's importlib mode leaves this folder out).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"


@dataclass
class OtlpReceiver:
    url: str  # what OTEL_EXPORTER_OTLP_ENDPOINT names
    received: list[ExportTraceServiceRequest] = field(default_factory=list)

    def spans(self, name: str) -> list[tuple[str, Any]]:
        """(service.name, span) of every span called `name` received so far."""
        out = []
        for request in list(self.received):
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                out += [(service, s) for scope in resource_spans.scope_spans for s in scope.spans if s.name == name]
        return out


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A receiver on a free loopback port for the duration of the block."""
    receiver = OtlpReceiver("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            status = 200
            if self.path != TRACES_PATH:
                status = 404
            elif self.headers.get("content-type") != PROTOBUF:
                status = 415
            else:
                receiver.received.append(ExportTraceServiceRequest.FromString(body))
            self.send_response(status)
            self.send_header("content-type", PROTOBUF)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True).start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
