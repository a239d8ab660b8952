"""UsageScanner: usage read from relayed bytes however the chunks split them."""

import pytest

from modelfleet.gateway.usage import UsageScanner

EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":200,"total_tokens":205}}\n\n'
STREAM = EVENT * 3 + USAGE + b"data: [DONE]\n\n"


def scan(chunks: list[bytes], request_bytes: int = 40) -> UsageScanner:
    scanner = UsageScanner(request_bytes)
    for chunk in chunks:
        scanner.feed(chunk)
    return scanner


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_usage_is_found_wherever_one_cut_falls(cut):
    assert scan([STREAM[:cut], STREAM[cut:]]).tokens() == 205


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 65])
def test_usage_is_found_in_chunks_of_any_size(size):
    scanner = scan([STREAM[i:i + size] for i in range(0, len(STREAM), size)])
    assert scanner.tokens() == 205


def test_a_stream_without_usage_counts_events_and_estimates_the_prompt():
    scanner = scan([EVENT * 4, b"data: [DONE]\n\n"], request_bytes=40)
    assert scanner.events == 4
    assert scanner.tokens() == 4 + 10


def test_the_last_usage_in_a_non_streamed_body_wins():
    body = b'{"choices":[{"message":{"content":"\\"total_tokens\\": 1"}}],"usage":{"total_tokens": 17}}'
    assert scan([body[:30], body[30:]]).tokens() == 17
