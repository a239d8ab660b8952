"""The admission rule for bursts: a bounded number in flight, and fair shares between keys."""

import pytest

from modelfleet.gateway.capacity import Capacity, judge
from modelfleet.protocol import OpenAIError


def test_a_full_model_refuses_with_503_and_a_key_past_its_share_with_429():
    assert judge(8, 0, 1, 8).status == 503
    assert judge(3, 3, 1, 8).admitted  # below half full: no shares yet
    assert judge(4, 4, 1, 8).status == 429  # a lone key holds at most half, so a newcomer finds room
    assert judge(4, 0, 2, 8).admitted  # the newcomer
    assert judge(6, 3, 3, 8).status == 429 and judge(6, 2, 3, 8).admitted  # share ceil(8/3) = 3
    assert judge(7, 7, 1, 8, shared=False).admitted  # an open gateway has one tenant


def test_releases_give_capacity_back_once():
    cap = Capacity(per_replica=4)
    releases = [cap.acquire("m", "a", replicas=1), cap.acquire("m", "a", replicas=1)]
    with pytest.raises(OpenAIError) as info:
        cap.acquire("m", "a", replicas=1)
    assert info.value.status == 429 and info.value.headers["retry-after"] == "1"
    b = cap.acquire("m", "b", replicas=1)
    releases[0]()
    releases[0]()  # a second call changes nothing
    assert cap.inflight["m"] == 2 and dict(cap.by_key["m"]) == {"a": 1, "b": 1}
    b()
    releases[1]()
    assert cap.inflight["m"] == 0 and not cap.by_key["m"]
    for _ in range(8):
        cap.acquire("m", "", replicas=2)
    with pytest.raises(OpenAIError) as info:
        cap.acquire("m", "", replicas=2)
    assert info.value.status == 503
