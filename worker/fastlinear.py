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

Each weight is held once, but for a tied LM head. Once packed, a layer's `weight` is a stand-in
that costs no memory: a zero expanded to the weight's shape, with its dtype and device (peft
places its adapters by them; a meta tensor would move them to meta), and `state_dict` unpacks the
packed copy again. An LM head tied to the input embeddings (`get_output_embeddings()`) gets a
packed copy and keeps the shared weight, which the embeddings read, as vLLM's CPU build does
(`dispatch_cpu_unquantized_gemm(layer, remove_weight=False)` for an embedding-backed head): the
plain head multiplied at ~10 GB/s against the packed layers' ~17 and took 3.2 ms of a 1-row
bfloat16 step of the bench model, for vocab x hidden more memory (`pack_linears` logs it; the
measurements are there). Such a head follows its weight: replaced (`tie_weights`) or written in
place (`load_state_dict`), it is packed again at its next forward. Any other shared weight stays
as loaded. A dropped weight changed after packing goes through `repack(weight)`: writing into the
stand-in (`load_state_dict`, peft's merge) raises, and peft's `safe_merge`, which replaces it,
would go unseen (the engine merges no adapter; peft's merge into a kept weight writes its `.data`,
which is unseen too).
"""

from __future__ import annotations

import copy
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
    packed_from: tuple[torch.Tensor, int | None] | None = None  # the weight packed and its version

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.dense and not self._packed_is_current():
            self.repack()  # a kept weight replaced or written in place since it was packed
        return torch.ops.mkldnn._linear_pointwise(input, self.packed, self.bias, "none", [], "")

    def repack(self, weight: torch.Tensor | None = None) -> None:
        """Packs `weight` (by default the layer's own, which must still be dense)."""
        if weight is None:
            if not self.dense:
                raise RuntimeError("this layer's weight was dropped after packing: pass the new weight")
            weight = self.weight
        self.hold(_packed(weight), weight)

    def _packed_is_current(self) -> bool:
        source, version = self.packed_from or (None, None)
        return source is self.weight and version == _version(self.weight)

    def hold(self, packed: torch.Tensor, weight: torch.Tensor) -> None:
        """Multiplies by `packed` from now on, packed from `weight` as it is now."""
        self.packed, self.packed_from = packed, (weight, _version(weight))

    def drop_dense(self) -> None:
        """Frees the weight as loaded, leaving a stand-in of its shape, dtype and device."""
        stand_in = torch.zeros((), dtype=self.weight.dtype, device=self.weight.device).expand(self.weight.shape)
        self.weight = nn.Parameter(stand_in, requires_grad=False)
        self.dense, self.packed_from = False, None

    def __deepcopy__(self, memo: dict) -> nn.Linear:
        """A plain, dense nn.Linear: the packed tensor is opaque to copying, and the copy's
        user writes into its weight (peft's `modules_to_save` copies the layer, an untied LM
        head most often, and loads the adapter's own weights into the copy). A kept weight is
        copied through `memo`, so a copy of a whole model keeps its LM head tied."""
        if self.dense:
            weight = copy.deepcopy(self.weight, memo)
        else:
            weight = nn.Parameter(self.packed.to_dense(), requires_grad=self.weight.requires_grad)
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = weight
        if self.bias is not None:
            plain.bias = copy.deepcopy(self.bias, memo)
        memo[id(self)] = plain
        return plain

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.dense:
            destination[prefix + "weight"] = self.packed.to_dense()


def _version(weight: torch.Tensor) -> int | None:
    """What in-place writes bump; None for an inference tensor, which has no version counter."""
    return None if weight.is_inference() else weight._version


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
    PackedLinear that holds its weight packed only, and an LM head tied to the input embeddings
    into one that holds a packed copy beside the shared weight; returns how many.

    Measured on the 56M bench Llama, one thread, AVX512-BF16 (bench/forward_probe.py, thread CPU
    time of the engine's decode steps, steps of the variants interleaved, 8 rounds of 60 on a
    loaded 2-core machine): in bfloat16 the packed layers but the tied LM head made a step -1-9%
    faster at 1 row and 11-17% at 32; packing the tied head too made it 4-17% faster again at 1
    row (median of the rounds 10%) and 5-14% at 32 (8%); the plain model's step took 1.05-1.22x
    as long at 1 row, 1.17-1.33x at 32. The cost is vocab x hidden more memory: 31 MiB, +39% of
    that model's weights in bfloat16, 12-21% on a tied 1-3B model. In float32 the packed layers
    gain 14-15% at 32 rows, but MKL's plain sgemv beats them at one row (a 1-row step 5% slower);
    a one-row path on the weight as loaded would hold it twice, so there is none."""
    why = packable(model)
    if why is not None:
        log.info("linear layers not prepacked: %s", why)
        return 0
    shared, files = _shared(model), _file_mappings()
    head = _tied_head(model, shared)
    count, copied = 0, 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not nn.Linear or _why_not(module.weight) is not None:
                continue
            keep = module.weight.data_ptr() in shared
            if keep and module is not head:
                continue
            try:
                _pack(module, check=count == 0)
            except (RuntimeError, AttributeError, NotImplementedError) as exc:
                # Only an optimisation: a build whose oneDNN ops are missing or misbehave
                # (another CPU architecture, an odd shape) serves on the layers as loaded.
                log.warning("linear layers not prepacked (%d were): %s", count, exc)
                break
            if keep:
                copied += module.weight.nbytes
            else:
                _drop_file_pages(module.weight, files)
                module.drop_dense()
            count += 1
    _give_back_freed_memory()
    log.info("%d linear layers on oneDNN-packed weights%s%s", count,
             f" (the tied LM head on a packed copy: +{copied / 2**20:.0f} MB)" if copied else "",
             " (other tied ones left as loaded)" if len(shared) > (head is not None) else "")
    return count


def _tied_head(model: nn.Module, shared: set[int]) -> nn.Module | None:
    """`model`'s LM head when its weight is shared (tied to the input embeddings), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) and head.weight.data_ptr() in shared else None


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
    module.hold(packed, module.weight)


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
