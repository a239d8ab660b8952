import random
from collections import Counter

from modelfleet.gateway.balancer import RequestView, least_load, prefix_affinity
from modelfleet.gateway.registry import Endpoint


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(url=f"http://10.0.0.{i}:8000", model="m", ready=True) for i in range(n)]


def test_least_load_prefers_the_idle_endpoint():
    eps = endpoints(2)
    eps[0].inflight = 5
    rng = random.Random(0)
    assert all(least_load(eps, RequestView(), rng) is eps[1] for _ in range(20))


def test_least_load_spreads_equal_load():
    eps = endpoints(4)
    rng = random.Random(0)
    counts = Counter(least_load(eps, RequestView(), rng).url for _ in range(400))
    assert len(counts) == 4 and min(counts.values()) > 50


def test_same_prefix_same_replica():
    eps = endpoints(4)
    rng = random.Random(0)
    view = RequestView(prefix="You are a helpful assistant. Conversation 17")
    picks = {prefix_affinity(eps, view, rng).url for _ in range(20)}
    assert len(picks) == 1


def test_prefixes_spread_over_replicas():
    eps = endpoints(4)
    rng = random.Random(0)
    counts = Counter(prefix_affinity(eps, RequestView(prefix=f"conversation {i}"), rng).url for i in range(400))
    assert len(counts) == 4 and min(counts.values()) > 40


def test_an_overloaded_home_replica_hands_over():
    eps = endpoints(3)
    rng = random.Random(0)
    view = RequestView(prefix="hot prefix")
    home = prefix_affinity(eps, view, rng)
    home.inflight = 20
    assert prefix_affinity(eps, view, rng) is not home


def test_removing_a_replica_moves_only_its_prefixes():
    eps = endpoints(4)
    rng = random.Random(0)
    before = {i: prefix_affinity(eps, RequestView(prefix=f"c{i}"), rng).url for i in range(200)}
    gone = eps[3].url
    after = {i: prefix_affinity(eps[:3], RequestView(prefix=f"c{i}"), rng).url for i in range(200)}
    moved = [i for i in before if before[i] != after[i]]
    assert all(before[i] == gone for i in moved)


def test_worker_queue_parsing_and_routing_fields():
    from modelfleet.engines import inflight_from_metrics as parse_queue
    from modelfleet.gateway.routing import RoutingFields, routing_fields

    text = ('# HELP x\nvllm:num_requests_running{model_name="m"} 3.0\n'
            'vllm:num_requests_waiting{model_name="m"} 2.0\nother 9\n')
    assert parse_queue(text) == 5
    assert parse_queue("nothing here") is None
    # vLLM also exports gauges whose names start alike; they are not the queue
    vllm = text + 'vllm:num_requests_waiting_by_reason{model_name="m",reason="capacity"} 7.0\n'
    assert parse_queue(vllm) == 5
    chat = routing_fields(b'{"model": "m", "messages": [{"role": "system", "content": "Be brief."}]}')
    assert chat == RoutingFields("m", stream=False) and chat.prefix(256) == "system:Be brief."
    story = routing_fields(b'{"model": "m", "prompt": "Once upon", "stream": true}')
    assert story == RoutingFields("m", stream=True) and story.prefix(4) == "Once"
