"""Linear layers on prepacked oneDNN weights, for a causal LM served on a CPU.

transformers' modules run every linear layer as `F.linear`, which on a CPU hands oneDNN
(bfloat16) or MKL (float32) the weight in PyTorch's plain row-major layout on every call. vLLM's
CPU build reorders each weight once at load into the blocked layout oneDNN's kernels read best
(`create_onednn_mm`); PyTorch offers the same without vLLM: `mkldnn._reorder_linear_weight`
packs a weight once and `mkldnn._linear_pointwise` multiplies by it (what inductor's freezing pass
emits for a frozen linear; used here without compiling, since the engine's step changes shape
every step). `pack_linears` turns a loaded model's `nn.Linear` modules into
`PackedLinear` in place (their class, not the module objects, changes), so the model and peft's
LoRA wrappers (which call their base layer) stay what they were.

Each weight is held once. Once packed, a layer's `weight` is a stand-in that costs no memory: a
zero expanded to the weight's shape, with its dtype and device (peft places its adapters by them;
a meta tensor would move them to meta), and `state_dict` unpacks the packed copy again. A weight
another module shares (an LM head tied to the input embeddings) is left unpacked: packing it
would hold vocab x hidden twice (see `pack_linears`). A weight changed after packing goes through
`repack(weight)`: writing into the stand-in (`load_state_dict`, peft's merge) raises, and
peft's `safe_merge`, which replaces it, would go unseen (the engine merges no adapter).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from collections import Counter

import torch
from torch import nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward multiplies by a oneDNN-packed copy of its weight."""

    packed: torch.Tensor
    dense = True  # `weight` holds the weight; False once `drop_dense` made it a stand-in

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(input, self.packed, self.bias, "none", [], "")

    def repack(self, weight: torch.Tensor | None = None) -> None:
        """Packs `weight` (by default the layer's own, which must still be dense)."""
        if weight is None:
            if not self.dense:
                raise RuntimeError("this layer's weight was dropped after packing: pass the new weight")
            weight = self.weight
        self.packed = _packed(weight)

    def drop_dense(self) -> None:
        """Frees the weight as loaded, leaving a stand-in of its shape, dtype and device."""
        stand_in = torch.zeros((), dtype=self.weight.dtype, device=self.weight.device).expand(self.weight.shape)
        self.weight = nn.Parameter(stand_in, requires_grad=False)
        self.dense = False

    def __deepcopy__(self, memo: dict) -> nn.Linear:
        """A plain, dense nn.Linear: the packed tensor is opaque to copying, and the copy's
        user writes into its weight (peft's `modules_to_save` copies the layer, an untied LM
        head most often, and loads the adapter's own weights into the copy)."""
        weight = self.packed.to_dense() if not self.dense else self.weight.detach().clone()
        copy = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                         device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            copy.weight.copy_(weight)
            if self.bias is not None:
                copy.bias.copy_(self.bias)
        copy.requires_grad_(self.weight.requires_grad)
        memo[id(self)] = copy
        return copy

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.dense:
            destination[prefix + "weight"] = self.packed.to_dense()


def packable(model: nn.Module) -> str | None:
    """None when `pack_linears` can run on `model`'s weights; else why not."""
    return _why_not(next(model.parameters()))


def _why_not(weight: torch.Tensor) -> str | None:
    if weight.device.type != "cpu":
        return f"weights on {weight.device.type}"
    if not torch.backends.mkldnn.is_available():
        return "PyTorch was built without oneDNN"
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bfloat16"
    if weight.dtype not in (torch.bfloat16, torch.float32):
        return f"weights in {weight.dtype}"  # oneDNN's half kernels need AVX512-FP16 or AMX-FP16
    return None


def _shared(model: nn.Module) -> set[int]:
    """The data pointers of parameters that more than one module holds (tied weights)."""
    holders = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    return {ptr for ptr, n in holders.items() if n > 1}


def pack_linears(model: nn.Module) -> int:
    """Turns every plain nn.Linear of `model` whose weight no other module shares into a
    PackedLinear that holds its weight packed only; returns how many.

    Measured on the 56M bench Llama, one thread, AVX512-BF16 (bench/forward_probe.py, thread CPU
    time of the engine's decode steps): in bfloat16 the packed layers, all but the tied LM head,
    make a step 0-8% faster at 1 row (it varies with the probe's load order) and 6-10% at 32.
    Packing the tied head too gave 5% more, for 39% more weight memory on that model (12-21% on a
    tied 1-3B model): a shared weight stays as loaded. In float32 the packed layers gain 14-15% at
    32 rows, but MKL's plain sgemv beats them at one row (a 1-row step 5% slower); a one-row path
    on the weight as loaded would hold it twice, so there is none."""
    why = packable(model)
    if why is not None:
        log.info("linear layers not prepacked: %s", why)
        return 0
    shared, files = _shared(model), _file_mappings()
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Linear and _why_not(module.weight) is None and module.weight.data_ptr() not in shared:
                try:
                    _pack(module, check=count == 0)
                except (RuntimeError, AttributeError, NotImplementedError) as exc:
                    # Only an optimisation: a build whose oneDNN ops are missing or misbehave
                    # (another CPU architecture, an odd shape) serves on the layers as loaded.
                    log.warning("linear layers not prepacked (%d were): %s", count, exc)
                    break
                _drop_file_pages(module.weight, files)
                module.drop_dense()
                count += 1
    _give_back_freed_memory()
    log.info("%d linear layers on oneDNN-packed weights%s", count, " (tied ones left as loaded)" if shared else "")
    return count


def _packed(weight: torch.Tensor) -> torch.Tensor:
    # no batch-size hint: packing for 1 row was slower at 32 rows and no faster at 1
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _pack(module: nn.Linear, check: bool) -> None:
    """Makes `module` a PackedLinear once its packed weight exists, so a failure leaves it as it
    was; with `check`, first proves the packed product equal to F.linear's on a random input."""
    packed = _packed(module.weight)
    if check:
        x = torch.randn(3, module.in_features, dtype=module.weight.dtype)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")
        want = nn.functional.linear(x, module.weight, module.bias)
        tolerance = 1e-2 if module.weight.dtype == torch.bfloat16 else 1e-4
        if not torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance * want.abs().max().item()):
            raise RuntimeError("oneDNN's packed product differs from F.linear's")
    module.__class__ = PackedLinear
    module.packed = packed


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges this process maps from files (safetensors maps a checkpoint loaded in
    its own dtype, and the weights are views of that mapping)."""
    try:
        with open("/proc/self/maps") as f:
            rows = [line.split() for line in f]
    except OSError:
        return []
    return [(int(a, 16), int(b, 16)) for a, _, b in (r[0].partition("-") for r in rows if len(r) > 5 and r[5][:1] == "/")]


def _drop_file_pages(weight: torch.Tensor, files: list[tuple[int, int]]) -> None:
    """Unmaps the pages of a weight read from a mapped file: the mapping lives on while the
    embeddings use it, and the pages packing read would count in RSS until memory ran short (the
    bench model in float32: +98 MB). They are clean: dropping them never changes what is read."""
    if not weight.is_contiguous():  # its bytes are not one range of its own
        return
    start, end = weight.data_ptr(), weight.data_ptr() + weight.nbytes
    if not any(a <= start and end <= b for a, b in files):
        return
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def _give_back_freed_memory() -> None:
    # glibc keeps the dropped weights' pages in its heap for reuse, and the process's RSS (what a
    # container's memory limit counts) with them: +50 MB on the bench model's 50 MB of packed
    # layers, +2 MB after malloc_trim
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
