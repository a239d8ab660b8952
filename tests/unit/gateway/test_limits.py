import pytest

from modelfleet.gateway.auth import ApiKey
from modelfleet.gateway.limits import RateLimiter, format_reset
from modelfleet.protocol import OpenAIError


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rpm_allows_the_limit_then_429_with_retry_after():
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    key = ApiKey("k", "0" * 64, rpm=3)
    remaining = [limiter.admit(key).headers["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    with pytest.raises(OpenAIError) as info:
        limiter.admit(key)
    assert info.value.status == 429 and int(info.value.headers["retry-after"]) == 60
    clock.now += 60.5
    assert limiter.admit(key).headers["x-ratelimit-limit-requests"] == "3"


def test_tpm_counts_reported_usage():
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    key = ApiKey("k", "0" * 64, tpm=100)
    limiter.admit(key).charge(60)
    limiter.admit(key).charge(60)  # crosses the limit: served, the next one waits
    with pytest.raises(OpenAIError) as info:
        limiter.admit(key)
    assert info.value.type == "tokens"
    clock.now += 61
    assert limiter.admit(key).headers["x-ratelimit-remaining-tokens"] == "100"


def test_each_replica_enforces_its_share():
    limiter = RateLimiter(replicas=lambda: 2, clock=Clock())
    key = ApiKey("k", "0" * 64, rpm=5)
    for _ in range(3):
        limiter.admit(key)
    with pytest.raises(OpenAIError):
        limiter.admit(key)


def test_keys_without_limits_and_open_gateways_pass():
    limiter = RateLimiter()
    assert limiter.admit(None).headers == {}
    assert limiter.admit(ApiKey("k", "0" * 64)).headers == {}


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (1, "1s"), (59.2, "1m0s"), (360, "6m0s")])
def test_reset_format(seconds, text):
    assert format_reset(seconds) == text
