"""Precision per role: what this CPU accelerates, and the weight forms that use it.

Two settings, chosen once at the edge (`load_kit(..., precision=)`, `app.py --precision`):

- `exact`: fp32 weights and activations, token for token what transformers gives.
- `fast`: the lowest-byte weights this machine runs well where quality holds (tested on
  real weights: the fill-mask probes, the zero-shot photos, greedy tokens, perplexity):
  * the offline causal LM runs from its own Q4_1 GGUF blocks in torch's 4-bit groupwise
    kernel (`_weight_int4pack_mm_for_cpu`): Q4_1 stores w = d*q + m per block of 32, the
    kernel computes w = (q - 8)*scale + zero, so scale = d and zero = m + 8d represent the
    GGUF weights exactly (fp32 scales; checked against gguf's own dequantisation);
  * other causal LMs quantise per output channel to int8 at load (`_weight_int8pack_mm`);
  * where the CPU has int8 dot products (VNNI, AMX), every fast causal LM's vocabulary head
    and prompts multiply int8 by int8 in two passes (`DynamicInt8Linear`;
    `quantized_lm.prefill_twin`), and so does text scoring (one pass, on a twin of the
    offline LM) and, where bf16 does not pay, the BERT roles;
  * encoders (BERT, MiniLM, CLIP, EfficientNet) are compute-bound: bf16 pays only where
    bf16 GEMMs beat fp32 (`encoders_bf16`): AMX tiles, or AVX-512 BF16 on AMD (Zen 4/5:
    3.6-5.4x measured for issue 17). On an Intel CPU without AMX a bf16 GEMM measured
    0.6-1.0x of fp32, so there they stay fp32 (batch size still chosen per model).

Tasks keep reading logits and attention weights of the same module, so token probabilities,
alternatives and the attention view work in every mode.
"""

import copy
import functools
import os
import platform
import threading
from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = ("exact", "fast")
Q4_GROUP = 32                     # elements per Q4_1 block (GGUF), = the int4 kernel's group
LM_ACTIVATIONS = torch.bfloat16   # what the low-bit LM kernels multiply in (fp32 paths are slow)


# ------------------------------------------------------------------ what the CPU has

@dataclass(frozen=True)
class Capability:
    vendor: str          # "GenuineIntel", "AuthenticAMD", ... ("" if unknown)
    model: str           # the CPU's model name
    isa: str             # torch's dispatch level: "AVX512", "AVX2", "DEFAULT", ...
    bf16: bool           # native bf16 dot products (AVX-512 BF16 / AMX): oneDNN bf16 is fast
    vnni: bool           # int8 dot products (AVX-512 VNNI)
    amx: bool            # AMX tiles (Sapphire Rapids and later)
    threads: int         # torch intra-op threads
    int8_kernel: bool    # torch has the weight-only int8 linear
    int4_kernel: bool    # torch has the 4-bit groupwise linear for CPU

    def line(self) -> str:
        yes = lambda b: "yes" if b else "no"  # noqa: E731
        return (f"CPU {self.model or '?'} ({self.vendor or '?'}), ISA {self.isa}, "
                f"bf16 {yes(self.bf16)}, VNNI {yes(self.vnni)}, AMX {yes(self.amx)}, "
                f"{self.threads} threads, torch {torch.__version__}")


def _cpuinfo() -> tuple:
    vendor = model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "model name" and not model:
                    model = value.strip()
                if vendor and model:
                    break
    except OSError:
        pass
    return vendor, model or platform.processor()


def _probe(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn else False
    except Exception:  # noqa: BLE001 - a probe that fails means "not available"
        return False


@functools.lru_cache(maxsize=1)
def _static_capability() -> tuple:
    vendor, model = _cpuinfo()
    bf16 = _probe("_is_avx512_bf16_supported") or _probe("_is_amx_tile_supported")
    try:
        bf16 = bf16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001
        bf16 = False
    return (vendor, model, torch.backends.cpu.get_cpu_capability(), bf16,
            _probe("_is_vnni_supported"), _probe("_is_amx_tile_supported"),
            hasattr(torch.ops.aten, "_weight_int8pack_mm"),
            hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def capability() -> Capability:
    """What this CPU and this torch build accelerate (threads read now: they can change)."""
    vendor, model, isa, bf16, vnni, amx, int8, int4 = _static_capability()
    return Capability(vendor, model, isa, bf16, vnni, amx, torch.get_num_threads(), int8, int4)


def resolve(precision, device) -> str:
    """"exact" or "fast" from a user's choice (None/"auto": $MMCORE_PRECISION, else "fast"
    where this machine has something faster than fp32, else "exact")."""
    choice = (precision or os.environ.get("MMCORE_PRECISION") or "auto").strip().lower()
    if choice not in PRECISIONS + ("auto",):
        from .errors import InputError

        raise InputError(f"Unknown precision {precision!r}; choose exact, fast or auto.")
    if choice != "auto":
        return choice
    if torch.device(device).type != "cpu":
        return "exact"         # GPU precision is autocast's job (device.autocast)
    cap = capability()
    return "fast" if (cap.bf16 or cap.int8_kernel or cap.int4_kernel) else "exact"


def encoders_bf16() -> bool:
    """Do bf16 encoder weights pay on this CPU? ($MMCORE_ENCODER_BF16=1/0 overrides.)"""
    forced = os.environ.get("MMCORE_ENCODER_BF16", "").strip().lower()
    if forced in ("1", "true", "yes", "0", "false", "no"):
        return forced in ("1", "true", "yes")
    cap = capability()
    return cap.bf16 and (cap.amx or cap.vendor == "AuthenticAMD")


# ------------------------------------------------------------------ weight-only linears

class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b, q int8 per output channel (symmetric), in one kernel."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias=None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight.contiguous())            # (N, K) int8
        self.register_buffer("scales", scales.contiguous())              # (N,) activation dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(scales.dtype),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype=torch.bfloat16) -> "Int8Linear":
        q, scales = quantize_int8(linear.weight.detach().float())
        return cls(q, scales.to(dtype), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight, for code that reads it (e.g. the tied embedding check)."""
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.scales.dtype),
                                               self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def quantize_int8(weight: torch.Tensor) -> tuple:
    """(int8 (N, K), fp32 scales (N,)): symmetric per output channel, max |w| -> 127."""
    scales = int8_scales(weight)
    q = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int8_scales(weight: torch.Tensor) -> torch.Tensor:
    """`quantize_int8`'s per-channel scales alone."""
    return weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0


class Int4Linear(nn.Module):
    """y = x @ W.T with W in 4-bit groups of 32 along the input: w = (q - 8)*scale + zero."""

    def __init__(self, packed: torch.Tensor, scale_zero: torch.Tensor, in_features: int,
                 out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed)                # the kernel's own packed layout
        self.register_buffer("scale_zero", scale_zero)        # (K/32, N, 2) activation dtype
        self.bias = None

    @classmethod
    def from_q4_1(cls, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                  dtype=torch.float32) -> "Int4Linear":
        """From GGUF Q4_1 blocks: q (N, K) in 0..15, d and m (N, K/32): w = d*q + m."""
        n, k = q.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        scale_zero = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous()
        return cls(packed, scale_zero.to(dtype), k, n)

    @property
    def weight(self) -> torch.Tensor:
        """The weight the kernel uses, (N, K): recovered by multiplying the identity."""
        eye = torch.eye(self.in_features, dtype=self.scale_zero.dtype)
        return self(eye).T.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(self.scale_zero.dtype).contiguous(), self.packed,
            Q4_GROUP, self.scale_zero)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class DynamicInt8Linear(nn.Module):
    """y = (xq @ q.T) * sx * scale + b: the weight int8 per output channel, the input
    quantised to int8 per row at run time (symmetric, max |x| -> 127), one int8 x int8
    product with int32 sums (`torch._int_mm`: VNNI dot products on the CPU).

    Unlike the weight-only kernels, whose cost grows with every row, it costs little more
    for 24 rows than for one (576x1536 on one thread: 31 us at 1 row, ~100 at 16, against
    72 / 442 for the 4-bit kernel), so it serves forwards over many tokens at once. Rows
    are quantised on their own and summed exactly in integers, so a row's result does not
    depend on what shares its batch.

    `passes=2` also quantises what the first rounding left, at a fixed 254th of the first
    step (x = sx*(q1 + q2/254) + under sx/508; both parts in one product of twice the rows,
    or two 1-row products for one row; a fixed step saves a second max and scale per row:
    bert-base shapes, 36 rows, 14-18% less time than a measured one): as accurate
    as int8 weights with exact activations (MiniLM, real weights: hidden-state error 3.0%
    against 6.9% in one pass, 3.0% weight-only), at ~1.3-1.7x the cost. One pass costs
    accuracy a weight-only form does not (SmolLM2 greedy tokens: near-tie flips), so
    generation keeps its own form for the body and two passes for the head
    (`quantized_lm._int8_head`), and one pass scores text (`quantized_lm.scoring_twin`),
    gated on the fill-mask probes and NSP pairs."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias=None,
                 passes: int = 1):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.passes = passes
        self.register_buffer("qweight_t", qweight.contiguous().T)        # (K, N) int8 view
        self.register_buffer("scales", scales.float().contiguous())      # (N,) fp32
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(),
                                                           requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias=None, passes: int = 1):
        """From an (N, K) float weight."""
        q, scales = quantize_int8(weight.detach().float())
        return cls(q, scales, bias, passes)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised (N, K) weight, a new fp32 copy per read (checks and tests; the
        forward never builds it)."""
        return self.qweight_t.T.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        m = rows.shape[0]
        sx = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
        t = rows / sx                                           # in [-127, 127]
        if self.passes == 1:
            y = torch._int_mm(t.round_().to(torch.int8), self.qweight_t).float()
        else:
            # what the first rounding left, t - q1, lies in [-1/2, 1/2]: at 254 steps per
            # unit it is a second int8 row (x = sx * (q1 + q2/254) + under sx/508)
            if m == 1:      # one row (a decode step): two 1-row products, ~2x cheaper than
                # one of 2 rows (a 49152-row head: 2 x 1.0 against 2.3 ms); the same sums.
                # Two tensors, not two slices of one buffer: compiled, inductor handed
                # `_int_mm` the slices of an in-graph int8 buffer wrongly (errors ~1e9)
                q1 = torch.round(t)
                q2 = torch.sub(t, q1).mul_(254.0).round_()
                y = torch._int_mm(q1.to(torch.int8), self.qweight_t).float().add_(
                    torch._int_mm(q2.to(torch.int8), self.qweight_t), alpha=1 / 254.0)
            else:
                q = rows.new_empty((2 * m, rows.shape[1]))
                q1 = torch.round(t, out=q[:m])
                torch.sub(t, q1, out=q[m:]).mul_(254.0).round_()
                q = q.to(torch.int8)
                y = torch._int_mm(q, self.qweight_t).float()
                y = y[:m].add_(y[m:], alpha=1 / 254.0)
        y = y.mul_(sx).mul_(self.scales)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


# Sibling linears that read one input, in the model families here: attention's q/k/v (Llama,
# BERT) and a gated MLP's gate/up (Llama). GPT-2's are one module already.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                       ("query", "key", "value"))
_shared_products = threading.local()


class SharedInputPart(nn.Module):
    """One linear of a group that reads one input (q/k/v): its columns of the group's fused
    product (a `DynamicInt8Linear`, or an `Int4Linear` of the parts' rows stacked). The first part
    called with an input runs the product for all (one quantisation of the input, one
    matmul); the others called with the very same tensor take their slices of it. An
    input it has not seen (or a part asked twice) runs the product again, so a part is
    right, only slower, unless the input is changed in place between its parts (no model
    family here does that). Each output column is its own sum (int8: per-row quantisation
    and exact integer sums; 4-bit: per-column groups), so each slice equals, bit for bit,
    the part's own product. The products in flight are per thread: concurrent forwards
    never mix. `torch.compile` traces it into one product and slices (no graph break)."""

    def __init__(self, owner: nn.Module, fused_name: str, index: int, start: int, end: int,
                 parts: int):
        super().__init__()
        # the fused module is registered once, on the parent (`owner`), and found there at
        # every call: whatever replaces it there (a copy's, a converted one) is what runs
        object.__setattr__(self, "_owner", owner)
        self.fused_name, self.index, self.start, self.end = fused_name, index, start, end
        self.parts = parts
        self.in_features, self.out_features = self.fused.in_features, end - start

    @property
    def fused(self) -> "DynamicInt8Linear | Int4Linear":
        return getattr(self._owner, self.fused_name)

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self.start:self.end]

    @property
    def qweight_t(self) -> torch.Tensor:
        return self.fused.qweight_t[:, self.start:self.end]

    @property
    def scales(self) -> torch.Tensor:
        return self.fused.scales[self.start:self.end]

    @property
    def passes(self) -> int:
        return self.fused.passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        live = _shared_products.__dict__.setdefault("live", {})
        fused = self.fused
        key = id(fused)
        entry = live.get(key)
        if entry is None or entry[0] is not x or self.index in entry[2]:
            entry = live[key] = (x, fused(x), set())
        entry[2].add(self.index)
        if len(entry[2]) == self.parts:             # every part served: let go of it
            del live[key]
        return entry[1][..., self.start:self.end]


def fuse_shared_inputs(module: nn.Module) -> int:
    """Replace each group of sibling `DynamicInt8Linear`s that read one input
    (`SHARED_INPUT_GROUPS`, same input size and passes) by `SharedInputPart`s of one fused
    product, registered on their parent as `fused_<names>`; the separate weights are let go
    (no extra memory once the originals are freed). Fewer, larger products: per SmolLM2
    layer 4 quantisations and int8 matmuls instead of 7. Returns how many groups."""
    fused_groups = 0
    for _, parent, names, linears in shared_input_groups(module):
        if not all(isinstance(lin, DynamicInt8Linear) for lin in linears) or \
                len({(lin.in_features, lin.passes) for lin in linears}) != 1:
            continue
        biases = [lin.bias for lin in linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(lin.out_features)
             for b, lin in zip(biases, linears)])
        fused = DynamicInt8Linear(torch.cat([lin.qweight_t.T for lin in linears]),
                                  torch.cat([lin.scales for lin in linears]), bias,
                                  linears[0].passes)
        install_fused(parent, names, fused, [lin.out_features for lin in linears])
        fused_groups += 1
    return fused_groups


def shared_input_groups(module: nn.Module):
    """(parent's name, parent, names, the modules there or None) for each parent under
    `module` and each of `SHARED_INPUT_GROUPS` (listed first: installing changes the tree)."""
    for parent_name, parent in list(module.named_modules()):
        for names in SHARED_INPUT_GROUPS:
            yield parent_name, parent, names, [getattr(parent, n, None) for n in names]


def install_fused(parent: nn.Module, names: tuple, fused: nn.Module,
                  sizes: list) -> None:
    """Register `fused` on `parent` as `fused_<names>` and make each of `names` a
    `SharedInputPart` of it (its `sizes[i]` output columns, in order)."""
    fused_name = "fused_" + "_".join(names)
    parent.add_module(fused_name, fused)
    start = 0
    for index, (name, size) in enumerate(zip(names, sizes)):
        setattr(parent, name, SharedInputPart(parent, fused_name, index, start, start + size,
                                              len(names)))
        start += size


class OneDNNLinear(nn.Module):
    """An fp32 linear whose weight lives in oneDNN's own layout, multiplied by oneDNN's
    GEMM instead of MKL's: the same fp32 arithmetic (sums in another order, ~1e-6 relative),
    for CPUs where MKL takes a slow path (`onednn_fp32_pays`). Inference only (no gradient
    for the weight). `weight` gives the dense fp32 weight back (a copy, bit for bit)."""

    def __init__(self, weight: torch.Tensor, bias=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        _register_onednn_linear()
        # a buffer, so copies that share a model's tensors (the attention view's eager
        # twin) share this one too; a state dict holds the dense weight instead
        self.register_buffer("packed", _onednn_layout(weight), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(),
                                                           requires_grad=False)

    @classmethod
    def from_module(cls, module: nn.Module) -> "OneDNNLinear":
        """From an `nn.Linear` or GPT-2's `Conv1D` (weight stored (in, out))."""
        weight = module.weight
        return cls(weight if isinstance(module, nn.Linear) else weight.T, module.bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def __deepcopy__(self, memo):
        # torch cannot deep-copy oneDNN's tensors: a copy repacks the dense weight, unless
        # the copy shares this module's tensors (they are in `memo`: attention.eager_twin)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = dict(self.__dict__)
        buffers = dict(state.pop("_buffers"))
        packed = buffers["packed"]
        if id(packed) not in memo:
            memo[id(packed)] = _onednn_layout(packed.to_dense())
        buffers["packed"] = memo[id(packed)]
        new.__dict__.update(copy.deepcopy(state, memo))
        new._buffers = buffers
        return new

    # a state dict holds the dense weight, as nn.Linear's does, and loading one repacks it
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        weight = state_dict.pop(prefix + "weight", None)
        super()._load_from_state_dict(state_dict, prefix, *args)
        if weight is not None:
            self.packed = _onednn_layout(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mmcore.onednn_linear(x.reshape(-1, self.in_features), self.packed,
                                           self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def _onednn_layout(weight: torch.Tensor) -> torch.Tensor:
    """A dense (N, K) weight as an fp32 tensor in oneDNN's layout (a new tensor)."""
    return weight.detach().float().contiguous().to_mkldnn()


_registering = threading.Lock()      # roles load in parallel threads: register the op once


def _register_onednn_linear() -> None:
    """oneDNN's fp32 linear as an op of our own, `torch.ops.mmcore.onednn_linear`: inductor
    lowers `mkldnn._linear_pointwise` only for frozen graph-constant weights, and calls an
    op it does not know as it is, so a compiled decode step (compiled.py) keeps these
    linears. Registered by the first OneDNNLinear (not at import)."""
    with _registering:
        if not hasattr(torch.ops.mmcore, "onednn_linear"):
            _define_onednn_linear()


def _define_onednn_linear() -> None:
    @torch.library.custom_op("mmcore::onednn_linear", mutates_args=())
    def onednn_linear(x: torch.Tensor, packed: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")

    @onednn_linear.register_fake
    def _(x, packed, bias):
        return x.new_empty(x.shape[0], packed.shape[0])


def onednn_fp32_pays() -> bool:
    """Do fp32 linears run faster through oneDNN than through MKL on this CPU? MKL picks its
    AVX-512 kernels only on Intel CPUs; elsewhere (AMD Zen 4/5 measured for issue 17) its
    fp32 GEMM takes a slower path: on 2 cores, SmolLM2's 49,152 x 576 head at batch 1 ran
    7.2 ms in MKL against 2.6 in oneDNN, a 256 x 768 x 3072 GEMM 7.1 ms against 2.8.
    oneDNN reads the CPU's features, not its vendor. ($MMCORE_FP32_GEMM=onednn / mkl
    overrides.)"""
    forced = os.environ.get("MMCORE_FP32_GEMM", "").strip().lower()
    usable = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                              "_linear_pointwise")
    if forced in ("onednn", "mkl"):
        return usable and forced == "onednn"
    cap = capability()
    return (usable and torch.backends.mkl.is_available() and platform.machine() in
            ("x86_64", "AMD64") and cap.vendor not in ("", "GenuineIntel"))


def exact_linears(model: nn.Module) -> str:
    """An inference-only model's fp32 linears (and GPT-2's Conv1D) through oneDNN where that
    pays (`onednn_fp32_pays`); the form it runs in, in words."""
    if not onednn_fp32_pays():
        return EXACT
    from transformers.pytorch_utils import Conv1D

    replace_linears(model, lambda name, lin: OneDNNLinear.from_module(lin),
                    kinds=(nn.Linear, Conv1D))
    return "exact (fp32, oneDNN GEMMs: MKL's fp32 path is slow on this CPU)"


def dynamic_int8_pays() -> bool:
    """Does this CPU have int8 dot products for `DynamicInt8Linear` (VNNI or AMX)?"""
    cap = capability()
    return hasattr(torch, "_int_mm") and (cap.vnni or cap.amx)


def replace_linears(module: nn.Module, make, skip=(), kinds=(nn.Linear,)) -> int:
    """Swap every linear under `module` (modules of `kinds`; names not in `skip`) for
    `make(name, linear)`; `make` may return None to keep one. Returns how many were swapped."""
    swapped = 0
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(sub, kinds) and full not in skip:
                new = make(full, sub)
                if new is not None:
                    setattr(child, attr, new)
                    swapped += 1
    return swapped


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (the weights a forward reads, at most)."""
    from .memory import own_bytes

    return own_bytes(module, set())


# ------------------------------------------------------------------ per role, at load

# Images per forward, per image tower and weight dtype, chosen by measuring
# (bench/bench_gallery.py, 2 cores): bigger is not better on a CPU once a batch's
# activations leave the caches. ViT-B/32: batch 32 fp32 best of 8/16/32 here; bf16 32 as
# measured for issue 17. EfficientNet-Lite0: batch 8 fp32 and bf16 (bf16 channels-last on an
# AMD EPYC: b4 139.5, b8 152.7, b16 126.9, b32 119.5 images/s; batch 32 was the worst
# setting in issue 17's sweep too).
IMAGE_BATCH = {("conse", torch.float32): 8, ("conse", torch.bfloat16): 8,
               ("clip", torch.float32): 32, ("clip", torch.bfloat16): 32}


def image_batch(tower: str, dtype: torch.dtype) -> int:
    """Images per forward for an image tower ("conse" or "clip") at a weight dtype."""
    return IMAGE_BATCH.get((tower, dtype), 16)


EXACT = "exact (fp32)"


def convert(precision: str, model: nn.Module, make_fast, make_exact=None) -> str:
    """The weight form `model` runs at `precision`, in words for the Models tab and the
    header: `make_fast()` converts it in place (once, at load) and says what it did;
    `make_exact()`, for a model only ever run (never trained), likewise at `exact` on a CPU."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    if precision != "fast":
        return make_exact() if (make_exact and on_cpu) else EXACT
    if not on_cpu:
        return "exact (fp32; GPU precision is autocast's)"
    return make_fast()


def fast_causal_lm(model: nn.Module) -> str:
    """A causal LM's linears as int8 per output channel, matmuls in bf16."""
    cap = capability()
    if not (cap.int8_kernel and cap.bf16):
        return "exact (fp32; no fast int8 path on this CPU)"
    from . import quantized_lm

    quantized_lm.int8_weights(model, LM_ACTIVATIONS)
    if not dynamic_int8_pays():
        return "fast: int8 weights per channel, bf16 matmuls"
    quantized_lm.prefill_twin(model)
    return "fast: int8 weights per channel, bf16 matmuls; head and prompts int8 x int8"


def fast_gguf_q4_1(model: nn.Module, gguf) -> str:
    """A llama-family LM run from its own GGUF Q4_1 blocks (bit-exact weights, 4-bit kernel;
    an int8 head); where the CPU has int8 dot products, its head, its prompts (two-pass,
    `quantized_lm.prefill_twin`) and the offline kit's text scoring (fill-mask, NSP: many
    tokens per forward, `quantized_lm.scoring_twin`) multiply int8 by int8."""
    from . import quantized_lm

    cap = capability()
    four_bit = cap.int4_kernel and cap.bf16
    form = "exact (fp32; no 4-bit kernel on this CPU)"
    if four_bit:
        quantized_lm.from_gguf_q4_1(model, gguf, LM_ACTIVATIONS)
        form = "fast: 4-bit Q4_1 blocks (the GGUF's own), bf16 matmuls"
    if not dynamic_int8_pays():
        return form + ("; int8 head" if four_bit else "")
    quantized_lm.scoring_twin(model, quantized_lm.gguf_twin_tensors(gguf, model))
    if not four_bit:
        return form + "; text scoring int8 x int8"
    quantized_lm.prefill_twin(model)              # prompts on two-pass int8, decoding 4-bit
    return form + "; head, prompts and text scoring int8 x int8"


def fast_encoder(*modules: nn.Module, channels_last: tuple = ()) -> str:
    """Encoders in bf16 where bf16 GEMMs pay; `channels_last`: conv towers among them, in
    channels-last layout either way (bench_gallery on 2 cores without AMX: EfficientNet-Lite0
    fp32 batch 8, 59.3 images/s NCHW, 72.0 channels-last)."""
    modules = tuple(m for m in modules if m is not None)
    for module in channels_last:
        if module is not None:
            module.to(memory_format=torch.channels_last)
    layout = " (image tower channels-last)" if channels_last else ""
    if not encoders_bf16():
        return "fp32 (bf16 GEMMs are no faster than fp32 on this CPU)" + layout
    for module in modules:
        module.to(torch.bfloat16)
    return "fast: bf16" + layout


def fold_batchnorm(module: nn.Module) -> int:
    """Fold each BatchNorm2d that directly follows a Conv2d among one parent's children into
    that conv, in place, from the norm's running statistics (inference only); the norm is
    replaced by what it applies after normalising (timm's BatchNormAct2d: its dropout and
    activation). Children are taken in their declared order, as timm's EfficientNet runs
    them (conv_stem/bn1, conv_dw/bn1, conv_pw/bn2, ...): `folded_twin` checks the result.
    Returns how many were folded."""
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (_, conv), (name, norm) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
                    and norm.running_var is not None and norm.affine
                    and conv.out_channels == norm.num_features):
                continue
            with torch.no_grad():
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias,
                                         requires_grad=False)
            after = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None))
                     if isinstance(m, nn.Module)]
            setattr(parent, name, nn.Sequential(*after))
            folded += 1
    return folded


def folded_twin(module: nn.Module, size: int = 224):
    """An inference copy of the fp32 conv tower `module` with its BatchNorms folded into the
    convs before them (`fold_batchnorm`): a norm is a pass over the activations of its own,
    and on a small-image CNN those passes cost as much as the convs (EfficientNet-Lite0,
    bf16 channels-last, batch 8, 2 cores: 199 -> 379 images/s for the tower). None where
    nothing folds, or where the copy's output on a test image differs from the tower's (a
    norm that does not run after the conv declared before it)."""
    twin = copy.deepcopy(module).eval()
    if not fold_batchnorm(twin):
        return None
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = module(x), twin(x)
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
        return None
    return twin


def fast_text_encoder(model: nn.Module) -> str:
    """A BERT-style model that is only ever run (fill-mask, NSP; never trained): bf16 where
    bf16 GEMMs pay, else int8 x int8 linears in two passes (`DynamicInt8Linear`: the
    accuracy of int8 weights with exact activations) where the CPU has int8 dot products:
    bert-base shape on 2 cores without AMX, 1.2-1.7x its fp32 forward."""
    if encoders_bf16() or not dynamic_int8_pays():
        return fast_encoder(model)
    replace_linears(model, lambda name, lin: DynamicInt8Linear.from_weight(lin.weight, lin.bias,
                                                                           passes=2))
    fuse_shared_inputs(model)                      # query/key/value: one product
    return "fast: int8 x int8 linears (int8 weights per channel, activations per row in 2 parts)"
