"""LoRA adapters on modelfleet's engine, behind vLLM's interface (`--lora-modules`,
`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, one /v1/models card per adapter).

peft does the LoRA work: it injects the adapters' A and B matrices into the engine's own model
object (in place, so the engine, the KV pool and the embedder keep calling the same model), and
its mixed-batch forward (`adapter_names`, one per row, "__base__" for the base) runs rows of
different adapters in one step. Two choices keep the base model as fast as before:

- nothing is wrapped until the first adapter loads, so a worker that never loads one runs the
  plain transformers model;
- once wrapped, no adapter is "active" in peft's sense (every LoRA layer's active list is empty),
  so a step without adapter rows is an ordinary forward whose LoRA layers add nothing, and only a
  step that holds adapter rows pays for peft's per-step hooks.

Each load gets its own peft key (`lora1`, `lora2`, ...; a served name may hold dots or slashes,
which peft's module dicts refuse), and the key is what requests carry: the prefix cache salts
its block hashes with it, so no request reuses KV computed under another adapter, or under an
earlier load of the same name.

Unloading takes the name away at once (new requests get 404, /v1/models stops listing it), while
requests already queued or running on it finish with it: its weights are deleted only once no
request of the engine holds its key (`_sweep`, before each forward and each load).

State: `by_name` belongs to the event loop; the peft model and `retiring` to the engine thread
(loads and unloads run there through `GenerationEngine.run_job`, between steps).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelfleet.protocol import OpenAIError

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for a row that runs without an adapter


@dataclass(frozen=True)
class Adapter:
    name: str  # what clients send as `model`
    path: str  # where it was loaded from: /v1/models' `root`, as vLLM lists it
    key: str  # peft's adapter name, unique per load
    rank: int
    created: int


def adapter_rank(config: dict[str, Any]) -> int:
    """The largest rank of an adapter_config.json (its `r`, or a larger per-module one)."""
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks)


def read_adapter(name: str, path: str, max_rank: int) -> dict[str, Any]:
    """The adapter's config, or the OpenAI error that says why it cannot load (vLLM's messages
    where vLLM has one: a missing adapter is its 404 `Loading lora ... failed`)."""
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise OpenAIError(f"Loading lora {name} failed: No adapter found for {path}", status=404,
                          param="lora_path", code="lora_adapter_not_found")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        rank = adapter_rank(config)
    except (OSError, ValueError, TypeError) as exc:
        raise OpenAIError(f"Loading lora {name} failed: {config_file} is not a readable adapter config ({exc}).",
                          param="lora_path", code="invalid_lora_adapter") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise OpenAIError(f"Loading lora {name} failed: {path} holds a {config.get('peft_type')} adapter; "
                          "only LoRA adapters are supported.", param="lora_path", code="invalid_lora_adapter")
    if rank > max_rank:
        raise OpenAIError(f"Loading lora {name} failed: LoRA rank {rank} is greater than max_lora_rank {max_rank} "
                          "(--max-lora-rank).", param="lora_path", code="lora_rank_too_large")
    if config.get("use_dora"):
        # peft's per-row adapter batches refuse DoRA ("Cannot pass `adapter_names` when DoRA is
        # enabled"), so every request would fail after a successful load: refuse the load.
        raise OpenAIError(f"Loading lora {name} failed: DoRA adapters (use_dora) are not supported.",
                          param="lora_path", code="invalid_lora_adapter")
    if config.get("bias", "none") != "none":
        raise OpenAIError(f"Loading lora {name} failed: Adapter bias is not supported.", param="lora_path",
                          code="invalid_lora_adapter")
    if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        # peft would fall back to a pickled adapter_model.bin: never unpickle what a request names
        raise OpenAIError(f"Loading lora {name} failed: {path} has no adapter_model.safetensors (pickled "
                          "adapter_model.bin files are not loaded).", param="lora_path", code="invalid_lora_adapter")
    return config


class LoraAdapters:
    """The adapters a generation worker holds, and how the engine runs rows with them."""

    def __init__(self, engine: Any, base_names: list[str], max_loras: int = 4, max_lora_rank: int = 16) -> None:
        self.engine = engine
        self.model = engine.model
        self.base_names = base_names
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.by_name: dict[str, Adapter] = {}
        self.peft: Any = None  # the PeftModel, from the first load on
        self.retiring: set[str] = set()  # keys unloaded by name that requests may still hold
        self.serial = itertools.count(1)
        self.lock = asyncio.Lock()  # one load or unload at a time: the checks and the change agree
        engine.lora = self

    # -- the event loop's side ------------------------------------------------------------------

    def resolve(self, model: str | None) -> Adapter | None:
        return self.by_name.get(model) if model is not None else None

    async def load(self, name: str | None, path: str | None, load_inplace: bool = False) -> str:
        """vLLM's /v1/load_lora_adapter: its success text, or an OpenAIError."""
        if not name or not path:
            raise OpenAIError("Both 'lora_name' and 'lora_path' must be provided.", code="invalid_lora_request")
        async with self.lock:
            if name in self.base_names:
                raise OpenAIError(f"The lora adapter '{name}' conflicts with a served base model.",
                                  param="lora_name", code="invalid_lora_request")
            previous = self.by_name.get(name)
            if previous is not None and not load_inplace:
                raise OpenAIError(f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                  "adapter in place, set 'load_inplace' to True.", param="lora_name",
                                  code="lora_adapter_exists")
            if previous is None and len(self.by_name) >= self.max_loras:
                raise OpenAIError(f"Cannot load lora adapter '{name}': this worker already holds {self.max_loras} "
                                  f"adapters ({', '.join(sorted(self.by_name))}), the most --max-loras allows. "
                                  "Unload one first.", status=400, param="lora_name", code="too_many_lora_adapters")
            config = read_adapter(name, path, self.max_lora_rank)
            key = f"lora{next(self.serial)}"
            started = time.monotonic()
            await self.engine.run_job(lambda: self._attach(key, path, name))
            self.by_name[name] = Adapter(name, path, key, adapter_rank(config), int(time.time()))
            if previous is not None:
                await self.engine.run_job(lambda: self._retire(previous.key))
            log.info("loaded LoRA adapter %s from %s (rank %d) in %.2fs", name, path, adapter_rank(config),
                     time.monotonic() - started)
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, name: str | None) -> str:
        """vLLM's /v1/unload_lora_adapter. Requests already queued or running on the adapter
        finish with it; the name is gone for new ones at once."""
        if not name:
            raise OpenAIError("'lora_name' needs to be provided to unload a LoRA adapter.",
                              code="invalid_lora_request")
        async with self.lock:
            adapter = self.by_name.pop(name, None)
            if adapter is None:
                raise OpenAIError(f"The lora adapter '{name}' cannot be found.", status=404,
                                  param="lora_name", code="lora_adapter_not_found")
            await self.engine.run_job(lambda: self._retire(adapter.key))
            log.info("unloaded LoRA adapter %s", name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    def load_static(self, modules: list[tuple[str, str]]) -> None:
        """`--lora-modules` at start-up, before the engine thread runs: an adapter that cannot
        load stops the worker (as in vLLM), with the same message the endpoint would give."""
        for name, path in modules:
            if name in self.base_names or name in self.by_name:
                raise OpenAIError(f"--lora-modules: the name '{name}' is taken by the base model or another adapter.")
            if len(self.by_name) >= self.max_loras:
                raise OpenAIError(f"--lora-modules names {len(modules)} adapters, more than --max-loras "
                                  f"{self.max_loras}.")
            config = read_adapter(name, path, self.max_lora_rank)
            key = f"lora{next(self.serial)}"
            self._attach(key, path, name)
            self.by_name[name] = Adapter(name, path, key, adapter_rank(config), int(time.time()))

    # -- the engine thread's side ---------------------------------------------------------------

    def _attach(self, key: str, path: str, name: str) -> None:
        """Loads adapter `name`'s weights into the model under `key` (engine thread)."""
        from peft import PeftModel

        self._sweep()
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=key, is_trainable=False)
            else:
                self.peft.load_adapter(path, adapter_name=key, is_trainable=False)
        except Exception as exc:  # peft's own reasons: target modules absent, shapes that differ
            self._detach(key)
            raise OpenAIError(f"Loading lora {name} failed: {exc}", param="lora_path",
                              code="invalid_lora_adapter") from None
        self._deactivate()
        self.model.eval()

    def _deactivate(self) -> None:
        """Empties every LoRA layer's active list, so a forward without `adapter_names` is the
        base model's (peft activates the first adapter it loads)."""
        from peft.tuners.lora import LoraLayer

        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                module.set_adapter([], inference_mode=True)

    def _detach(self, key: str) -> None:
        """Deletes adapter `key`; also what a first load that failed half-way injected, before
        there was a PeftModel to ask."""
        if self.peft is not None and key in self.peft.peft_config:
            self.peft.delete_adapter(key)
        elif self.peft is None:
            from peft.tuners.lora import LoraLayer

            for module in self.model.modules():
                if isinstance(module, LoraLayer) and key in module.lora_A:
                    module.delete_adapter(key)
        self._deactivate()

    def _retire(self, key: str) -> None:
        self.retiring.add(key)
        self._sweep()

    def in_use(self) -> set[str]:
        """The adapter keys of every request the engine holds (engine thread)."""
        engine = self.engine
        with engine.wakeup:
            inbox = list(engine.inbox)
        states = [*inbox, *engine.waiting, *engine.admitting]
        keys = {s.request.adapter for s in states} | {seq.owner.request.adapter for seq in engine.rows}
        keys.discard(None)
        return keys

    def _sweep(self) -> None:
        """Deletes the weights of unloaded adapters that no request holds any more."""
        if not self.retiring:
            return
        done = self.retiring - self.in_use()
        for key in done:
            self._detach(key)
        self.retiring -= done

    def forward(self, names: list[str | None]) -> Callable[..., Any]:
        """The callable that runs one forward whose batch rows use `names` (peft keys; None for
        the base model): the plain model when no row has an adapter (engine thread)."""
        self._sweep()
        if self.peft is None or not any(names):
            return self.model
        adapter_names = [name or BASE for name in names]

        def run(**kwargs: Any) -> Any:
            # peft's own mechanism behind PeftModel(adapter_names=...): pre-forward hooks that
            # hand each LoRA layer the per-row names, on the model the engine calls directly
            with self.peft.base_model._enable_peft_forward_hooks(adapter_names=adapter_names):
                return self.model(**kwargs)

        return run
