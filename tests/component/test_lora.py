"""LoRA adapters on modelfleet's engine (worker/adapters.py), on the demo model with random
adapters from modelfleet.demo.make_demo_adapter: each row runs with its own adapter, batch-mates
change nothing, and the endpoints answer as vLLM's do."""

import asyncio
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelfleet.demo import make_demo_adapter
from modelfleet.worker.sampling import SamplingParams
from modelfleet.worker.sequence import GenerationRequest

from .conftest import Api

PROMPTS = ["Hello there", "def foo(x):\n    return", "import os\n" * 5]
LONG = "class Cache:\n    def __init__(self):\n        self.items = {}\n" * 6  # several prefix-cache blocks


@pytest.fixture(scope="module")
def adapter_dirs(demo_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": str(make_demo_adapter(demo_path, root / "a", rank=8, seed=1)),
        "b": str(make_demo_adapter(demo_path, root / "b", rank=4, seed=2)),
        "c": str(make_demo_adapter(demo_path, root / "c", rank=8, seed=3)),
        "wide": str(make_demo_adapter(demo_path, root / "wide", rank=32, seed=4)),
    }


@pytest.fixture(scope="module")
def lora_worker(demo_path, adapter_dirs):
    """A worker of its own (the session's `worker` must stay adapter-free) with adapter `ada`
    loaded from the command line and room for one more; in float32, as the references are."""
    from modelfleet.worker.app import WorkerSettings, create_app, load_service

    settings = WorkerSettings(source=str(demo_path), served_names=["tiny-chat"], max_num_seqs=8, dtype="float32",
                              lora_modules=(("ada", adapter_dirs["a"]),), max_loras=2)
    service, metrics = load_service(settings)
    service.engine.start()
    yield Api(create_app(service, metrics)), service
    service.engine.stop()


@pytest.fixture(scope="module")
def tok(demo_path):
    return AutoTokenizer.from_pretrained(demo_path)


def peft_reference(demo_path, adapter_dir: str | None, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens from peft's own PeftModel.generate (or the bare model's, for the base)."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(demo_path, attn_implementation="sdpa").eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


async def run(engine, prompt_ids, max_tokens, adapter=None, delay=0.0, params=None, seed=None):
    """(tokens, prompt tokens whose KV came from the prefix cache) of one engine request."""
    await asyncio.sleep(delay)
    req = GenerationRequest(prompt_ids=prompt_ids, params=params or SamplingParams(temperature=0),
                            max_tokens=max_tokens, ignore_eos=True, seed=seed, adapter=adapter)
    stream = engine.submit(req)
    tokens: list[int] = []
    async for event in stream:
        assert event.error is None, event.error
        for d in event.deltas:
            tokens += d.token_ids
    return tokens, stream.state.cached_tokens


def key(service, name: str) -> str:
    return service.lora.by_name[name].key


def test_adapter_output_equals_peft_generate_and_differs_from_base(lora_worker, demo_path, adapter_dirs, tok):
    _, service = lora_worker
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with_adapter, _ = asyncio.run(run(service.engine, ids, 16, key(service, "ada")))
        base, _ = asyncio.run(run(service.engine, ids, 16))
        assert with_adapter == peft_reference(demo_path, adapter_dirs["a"], ids, 16)
        assert base == peft_reference(demo_path, None, ids, 16)
        assert with_adapter != base


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(lora_worker, demo_path, adapter_dirs, tok):
    """Base, adapter A and adapter B rows in the same steps, leaving at different times."""
    api, service = lora_worker
    assert api.post("/v1/load_lora_adapter", json={"lora_name": "adb", "lora_path": adapter_dirs["b"]}).status_code == 200
    try:
        names = [None, key(service, "ada"), key(service, "adb")]
        jobs = [(tok(p)["input_ids"], names[(i + j) % 3], 12 + 3 * j) for i, p in enumerate(PROMPTS) for j in range(2)]

        alone = [asyncio.run(run(service.engine, ids, n, adapter))[0] for ids, adapter, n in jobs]

        async def together():
            # submitted together, so that they share steps; their lengths differ, so they leave apart
            return await asyncio.gather(*[run(service.engine, ids, n, adapter) for ids, adapter, n in jobs])

        steps = service.engine.stats.steps
        mixed = [tokens for tokens, _ in asyncio.run(together())]
        assert service.engine.stats.steps - steps < sum(n for _, _, n in jobs)  # they did share steps
        assert mixed == alone
        by_adapter = {"ada": adapter_dirs["a"], "adb": adapter_dirs["b"]}
        for (ids, adapter, n), tokens in zip(jobs, alone, strict=True):
            name = next((k for k in by_adapter if adapter == key(service, k)), None)
            assert tokens == peft_reference(demo_path, by_adapter.get(name), ids, n), (name, ids, n)
    finally:
        api.post("/v1/unload_lora_adapter", json={"lora_name": "adb"})


def test_seeded_sampling_on_an_adapter_ignores_batch_mates(lora_worker, tok):
    _, service = lora_worker
    ids = tok("Once upon a time")["input_ids"]
    params = SamplingParams(temperature=1.0, top_p=0.9)
    alone, _ = asyncio.run(run(service.engine, ids, 24, key(service, "ada"), params=params, seed=77))

    async def crowded():
        noise = [run(service.engine, tok(p)["input_ids"], 20, a, params=SamplingParams(temperature=1.3))
                 for p, a in zip(PROMPTS, [None, key(service, "ada"), None], strict=True)]
        results = await asyncio.gather(run(service.engine, ids, 24, key(service, "ada"), delay=0.01, params=params,
                                           seed=77), *noise)
        return results[0][0]

    assert asyncio.run(crowded()) == alone


def test_the_prefix_cache_never_crosses_adapters(lora_worker, demo_path, adapter_dirs, tok):
    _, service = lora_worker
    ids = tok(LONG + "# a\n")["input_ids"]
    assert len(ids) >= 4 * service.engine.config.prefix_cache_block_size
    base, base_cached = asyncio.run(run(service.engine, ids, 8))
    first, first_cached = asyncio.run(run(service.engine, ids, 8, key(service, "ada")))
    again, again_cached = asyncio.run(run(service.engine, ids, 8, key(service, "ada")))
    base_again, base_again_cached = asyncio.run(run(service.engine, ids, 8))
    assert first_cached == 0  # the base's blocks are not the adapter's
    assert again_cached > 0 and base_again_cached > 0  # each reuses its own
    assert first == again == peft_reference(demo_path, adapter_dirs["a"], ids, 8)
    assert base == base_again == peft_reference(demo_path, None, ids, 8)


def test_models_lists_each_adapter_with_its_base_as_parent(lora_worker, adapter_dirs):
    api, _ = lora_worker
    r = api.post("/v1/load_lora_adapter", json={"lora_name": "adc", "lora_path": adapter_dirs["c"]})
    try:
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'adc' added successfully."
        cards = {c["id"]: c for c in asyncio.run(_get(api, "/v1/models"))["data"]}
        assert set(cards) == {"tiny-chat", "ada", "adc"}
        assert cards["tiny-chat"]["parent"] is None
        for name, path in (("ada", adapter_dirs["a"]), ("adc", adapter_dirs["c"])):
            assert cards[name]["parent"] == "tiny-chat" and cards[name]["root"] == path
            assert cards[name]["object"] == "model"
        assert asyncio.run(_get(api, "/v1/models/adc"))["parent"] == "tiny-chat"
    finally:
        api.post("/v1/unload_lora_adapter", json={"lora_name": "adc"})


async def _get(api: Api, path: str) -> dict:
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app), base_url="http://worker") as client:
        r = await client.get(path)
    assert r.status_code == 200, r.text
    return r.json()


def test_load_at_runtime_then_use_then_unload(lora_worker, adapter_dirs):
    api, service = lora_worker
    body = {"prompt": "def main(", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    api.error("/v1/completions", {**body, "model": "adc"}, param="model", status=404)
    r = api.post("/v1/load_lora_adapter", json={"lora_name": "adc", "lora_path": adapter_dirs["c"]})
    assert r.status_code == 200, r.text
    with_adapter = api.ok("/v1/completions", {**body, "model": "adc"})
    base = api.ok("/v1/completions", {**body, "model": "tiny-chat"})
    assert with_adapter["model"] == "adc"
    assert with_adapter["choices"][0]["text"] != base["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 12, "temperature": 0}
    assert api.ok("/v1/chat/completions", {**chat, "model": "adc"})["choices"][0]["message"]["content"] != \
        api.ok("/v1/chat/completions", {**chat, "model": "tiny-chat"})["choices"][0]["message"]["content"]
    responses = {"input": "Say something", "max_output_tokens": 12, "temperature": 0}
    answer = api.ok("/v1/responses", {**responses, "model": "adc"})
    assert answer["model"] == "adc" and answer["status"] in ("completed", "incomplete")

    r = api.post("/v1/unload_lora_adapter", json={"lora_name": "adc"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'adc' removed successfully."
    err = api.error("/v1/completions", {**body, "model": "adc"}, param="model", status=404)
    assert err["code"] == "model_not_found"
    err = api.error("/v1/unload_lora_adapter", {"lora_name": "adc"}, param="lora_name", status=404)
    assert err["message"] == "The lora adapter 'adc' cannot be found."
    assert api.ok("/v1/completions", {**body, "model": "tiny-chat"})["choices"][0]["text"] == base["choices"][0]["text"]


def test_an_unloaded_adapter_lets_running_requests_finish(lora_worker, adapter_dirs, tok):
    """Unloading takes the name away at once; a request already running on it finishes with
    it, and only then are its weights dropped."""
    api, service = lora_worker
    assert api.post("/v1/load_lora_adapter", json={"lora_name": "adc", "lora_path": adapter_dirs["c"]}).status_code == 200
    adc = key(service, "adc")
    ids = tok("Once upon a time")["input_ids"]
    alone, _ = asyncio.run(run(service.engine, ids, 60, adc))

    async def unload_midway():
        task = asyncio.create_task(run(service.engine, ids, 60, adc))
        while not any(seq.owner.request.adapter == adc for seq in service.engine.rows):
            await asyncio.sleep(0.005)
        message = await service.lora.unload("adc")
        assert adc in service.lora.retiring  # still held by the running request
        return message, await task

    message, (tokens, _) = asyncio.run(unload_midway())
    assert message == "Success: LoRA adapter 'adc' removed successfully."
    assert tokens == alone
    asyncio.run(run(service.engine, ids, 2))  # any later step sweeps it
    assert not service.lora.retiring and adc not in service.lora.peft.peft_config


def test_bad_adapters_get_clear_errors_and_the_worker_stays_healthy(lora_worker, adapter_dirs, tmp_path):
    api, service = lora_worker
    load = "/v1/load_lora_adapter"
    err = api.error(load, {"lora_name": "x", "lora_path": str(tmp_path / "missing")}, status=404)
    assert err["message"] == f"Loading lora x failed: No adapter found for {tmp_path / 'missing'}"
    err = api.error(load, {"lora_name": "x", "lora_path": adapter_dirs["wide"]}, param="lora_path")
    assert "LoRA rank 32 is greater than max_lora_rank 16" in err["message"]
    err = api.error(load, {"lora_name": "ada", "lora_path": adapter_dirs["b"]}, param="lora_name")
    assert err["message"].startswith("The lora adapter 'ada' has already been loaded.")
    err = api.error(load, {"lora_name": "tiny-chat", "lora_path": adapter_dirs["b"]}, param="lora_name")
    assert "conflicts with a served base model" in err["message"]
    assert api.error(load, {"lora_name": "x"})["message"] == "Both 'lora_name' and 'lora_path' must be provided."
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    assert "not a readable adapter config" in api.error(load, {"lora_name": "x", "lora_path": str(tmp_path / "broken")},
                                                         param="lora_path")["message"]
    # an adapter for another model: right files, shapes that do not fit
    other = tmp_path / "other"
    other.mkdir()
    source = Path(adapter_dirs["b"])
    config = json.loads((source / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_module"]}))
    (other / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    err = api.error(load, {"lora_name": "x", "lora_path": str(other)}, param="lora_path")
    assert err["message"].startswith("Loading lora x failed:")
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    err = api.error(load, {"lora_name": "x", "lora_path": str(dora)}, param="lora_path")
    assert "DoRA adapters (use_dora) are not supported" in err["message"]
    # the limit: `ada` plus one more
    assert api.post(load, json={"lora_name": "adb", "lora_path": adapter_dirs["b"]}).status_code == 200
    try:
        err = api.error(load, {"lora_name": "adc", "lora_path": adapter_dirs["c"]}, param="lora_name")
        assert err["code"] == "too_many_lora_adapters" and "--max-loras" in err["message"]
    finally:
        api.post("/v1/unload_lora_adapter", json={"lora_name": "adb"})
    err = api.error("/v1/embeddings", {"model": "ada", "input": "hello"}, param="model")
    assert "LoRA adapter of `tiny-chat`" in err["message"]
    assert "x" not in service.lora.by_name
    assert service.failure() is None
    assert api.ok("/v1/completions", {"model": "ada", "prompt": "hi", "max_tokens": 4})["model"] == "ada"


def test_a_first_load_that_fails_leaves_the_base_model_as_it_was(demo_path, adapter_dirs, tmp_path, tok):
    """Before any adapter, the model is not wrapped at all; a first load that fails half-way
    must not leave LoRA layers that change the base model's output."""
    from modelfleet.worker.app import WorkerSettings, create_app, load_service

    service, metrics = load_service(WorkerSettings(source=str(demo_path), served_names=["tiny-chat"], max_num_seqs=4,
                                                   dtype="float32"))
    service.engine.start()
    try:
        api = Api(create_app(service, metrics))
        ids = tok(PROMPTS[1])["input_ids"]
        before, _ = asyncio.run(run(service.engine, ids, 12))
        source = Path(adapter_dirs["a"])
        config = json.loads((source / "adapter_config.json").read_text())
        shapes = tmp_path / "wrong-shapes"  # the targets exist; the saved weights do not fit them
        shapes.mkdir()
        (shapes / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
        (shapes / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
        err = api.error("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(shapes)}, param="lora_path")
        assert err["message"].startswith("Loading lora x failed:")
        after, _ = asyncio.run(run(service.engine, ids, 12))
        assert after == before
        assert service.failure() is None and not service.lora.by_name
        r = api.post("/v1/load_lora_adapter", json={"lora_name": "ada", "lora_path": adapter_dirs["a"]})
        assert r.status_code == 200, r.text
        assert asyncio.run(run(service.engine, ids, 12, service.lora.by_name["ada"].key))[0] != before
        assert asyncio.run(run(service.engine, ids, 12))[0] == before
    finally:
        service.engine.stop()


def test_a_prompt_prefilled_in_chunks_runs_with_its_adapter(demo_path, adapter_dirs, tok):
    """A prompt longer than a step's prefill budget is prefilled a chunk a step (chunked.py);
    every chunk runs with the request's adapter, and the output still equals peft's."""
    from modelfleet.worker.app import WorkerSettings, load_service

    service, _ = load_service(WorkerSettings(source=str(demo_path), served_names=["tiny-chat"], max_num_seqs=4,
                                             dtype="float32", max_num_batched_tokens=32,
                                             lora_modules=(("ada", adapter_dirs["a"]),)))
    service.engine.start()
    try:
        ids = tok(LONG + "# chunked\n")["input_ids"]
        assert len(ids) > 3 * 32
        with_adapter, _ = asyncio.run(run(service.engine, ids, 10, service.lora.by_name["ada"].key))
        assert sum(step.chunked for step in service.engine.step_log) >= 3
        assert with_adapter == peft_reference(demo_path, adapter_dirs["a"], ids, 10)
        assert asyncio.run(run(service.engine, ids, 10))[0] == peft_reference(demo_path, None, ids, 10)
    finally:
        service.engine.stop()
