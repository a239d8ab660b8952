"""A worker process's log when clients hang up: one line per request, never a traceback (a
client that leaves is not a server error, and a traceback per disconnect buries real ones)."""


import httpx
import pytest

from modelfleet.demo import ensure_demo_model
from modelfleet.devcluster import wait_for

from .conftest import running, send_request, start, stop

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc, url = start(["--log-level", "info", "worker", "--model", str(ensure_demo_model()), "--served-name", "tiny"],
                      {"tiny"}, log)
    yield url, log
    stop(proc)


def test_disconnects_log_one_line_and_no_traceback(worker):
    url, log = worker
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1900, "ignore_eos": True}
    # Hangs up once the request runs (a fixed wait could outlast all 1900 tokens on an idle machine).
    connection = send_request(f"{url}/v1/chat/completions", body)
    try:
        wait_for(lambda: running(url), 30, "the request to be running", interval=0.05)
    finally:
        connection.close()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 10:
                break
    wait_for(lambda: log.read_text().count("disconnected") >= 2, 10, "two disconnect lines in the log",
             interval=0.1, explain=lambda: log.read_text()[-3000:])
    text = log.read_text()
    assert "client disconnected before the response" in text and "client disconnected mid-stream" in text
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]
    assert httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60).status_code == 200
