"""Causal LMs in low-byte weight forms, for the `fast` precision.

- `from_gguf_q4_1(model, gguf)`: the offline SmolLM2 runs from the Q4_1 blocks it ships in
  (4-bit groups of 32, the GGUF's own numbers: no second rounding), its tied vocabulary
  head (Q8_0 in the GGUF) in per-channel int8.
- `int8_weights(model)`: any causal LM, every linear per-channel int8 at load.
- `scoring_twin(model)`: a second module tree over the same embeddings and norms whose
  linears multiply int8 by int8 (`DynamicInt8Linear`), for forwards over many tokens
  (fill-mask and NSP scoring), where the weight-only kernels' cost grows with every row.

The first two keep the model an ordinary transformers model (same forward, cache, attention
switch), so everything that reads its logits or attention weights works unchanged.
"""

import copy
import itertools
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .precision import (SHARED_INPUT_GROUPS, DynamicInt8Linear, Int4Linear, Int8Linear,
                        dynamic_int8_pays, fuse_shared_inputs, install_fused, int8_scales,
                        quantize_int8, replace_linears, shared_input_groups)

# GGUF tensor name (per block) -> transformers Llama module name (per layer)
_LLAMA_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_Q4_1_BYTES = 20                  # per block: fp16 d, fp16 m, 16 bytes of nibbles


def q4_1_blocks(raw: np.ndarray) -> tuple:
    """GGUF Q4_1 rows (N, blocks*20 bytes) -> q (N, K) uint8 in 0..15, d, m (N, K/32) fp32.
    Element j of a block is the low nibble of byte j (j < 16), else the high nibble of j-16."""
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, _Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, -1)
    return q, d, m


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rotary permutation of q/k (as transformers does)."""
    rows = np.arange(n_rows)
    return rows.reshape(n_head, n_rows // n_head // 2, 2).swapaxes(2, 1).reshape(-1)


def read_q4_1(gguf_path, config) -> dict:
    """{HF module name: raw Q4_1 rows (N, blocks*20) uint8} of every Q4_1 linear in a Llama
    GGUF, rows in transformers' order. Cached under $MMCORE_CACHE: parsing the GGUF's
    metadata (its whole vocabulary) takes seconds, reading the cache well under one."""
    from filelock import FileLock
    from safetensors.numpy import load_file, save_file

    from . import cache

    stat = Path(gguf_path).stat()
    key = f"{Path(gguf_path).name}:{stat.st_size}:{int(stat.st_mtime)}:q4_1-rows-v1"
    folder = cache.models_dir() / f"{Path(gguf_path).stem.lower()}-q4_1-rows"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if cache.is_complete(folder, key):
            try:
                return load_file(str(folder / "rows.safetensors"))
            except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt
                pass
        rows = _parse_q4_1(gguf_path, config)
        with cache.atomic_folder(folder, key) as tmp:
            save_file(rows, str(tmp / "rows.safetensors"))
    return rows


def _parse_q4_1(gguf_path, config) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    out = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")            # blk.{i}.{kind}.weight
        if (tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1 or len(parts) != 4
                or parts[0] != "blk" or parts[2] not in _LLAMA_NAMES):
            continue
        raw = np.ascontiguousarray(tensor.data)
        if parts[2] in ("attn_q", "attn_k"):     # a block is part of one row: permute rows
            heads = config.num_attention_heads if parts[2] == "attn_q" else \
                config.num_key_value_heads
            raw = np.ascontiguousarray(raw[_unpermute_rows(raw.shape[0], heads)])
        out[f"model.layers.{parts[1]}.{_LLAMA_NAMES[parts[2]]}"] = raw
    return out


def _int8_head(model, dtype) -> None:
    """The vocabulary head in per-channel int8; a tied embedding keeps its own table. Where
    the CPU has int8 dot products, int8 x int8 in two passes (`DynamicInt8Linear`: the
    accuracy of int8 weights with exact activations, rows on their own): SmolLM2's
    49152-row head on one thread at 8 rows 5.8 ms against 8.0 for the weight-only kernel,
    16 rows 10.2 against 16.2, 1 row 2.2 against 2.1 (the scheduler, 8 streams: 116 ->
    124-127 tok/s; 1 stream unchanged within noise)."""
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        if head.weight is model.get_input_embeddings().weight:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        if dynamic_int8_pays():
            new = DynamicInt8Linear.from_weight(head.weight, head.bias, passes=2)
        else:
            new = Int8Linear.from_linear(head, dtype)
        model.set_output_embeddings(new)
        model.config.tie_word_embeddings = False


@torch.no_grad()
def from_gguf_q4_1(model, gguf_path: Path, dtype=torch.float32) -> int:
    """Swap the Q4_1 linears of a GGUF-converted Llama for 4-bit ones built from its blocks
    (q/k/v and gate/up: one product each, `SharedInputPart`s of it: per SmolLM2 layer 4
    4-bit matmuls instead of 7; bench_generate on two AMD EPYC cores: eager 3.41-3.59x ->
    3.51-3.75x the pipeline, compiled 4.50-4.67x -> 4.90x), and the head for int8.
    Returns the number of linears now 4-bit."""
    tensors = _int4_tensors(gguf_path, model.config, dtype)

    def layer(name, out_features, in_features):
        sz = tensors[f"{name}.scale_zero"]
        if tuple(sz.shape) != (in_features // 32, out_features, 2):
            raise ValueError(f"{name}: GGUF scales {tuple(sz.shape)} do not fit "
                             f"({out_features}, {in_features})")
        return Int4Linear(tensors[f"{name}.packed"], sz, in_features, out_features)

    swapped = _install_stored(model, tensors, "packed", layer)
    swapped += replace_linears(model, lambda name, linear: layer(name, *linear.weight.shape)
                               if f"{name}.packed" in tensors else None)
    _int8_head(model, dtype)
    return swapped


def _install_stored(model: nn.Module, tensors: dict, field: str, build) -> int:
    """Each `SHARED_INPUT_GROUPS` group stored fused in `tensors` (`_store_fused`: a key
    `{parent}.fused_{names}.{field}`) whose parts are still separate linears on `model`
    becomes `SharedInputPart`s of one module, `build(key, out_features, in_features)`.
    Returns how many linears it replaced."""
    replaced = 0
    for parent_name, parent, names, parts in shared_input_groups(model):
        key = f"{parent_name}.fused_{'_'.join(names)}"
        if f"{key}.{field}" in tensors and all(isinstance(p, nn.Linear) for p in parts):
            sizes = [p.out_features for p in parts]
            install_fused(parent, names, build(key, sum(sizes), parts[0].in_features), sizes)
            replaced += len(names)
    return replaced


def _store_fused(out: dict, fields: dict) -> None:
    """In `out` ({module name.field: tensor}), each `SHARED_INPUT_GROUPS` group whose parts
    are all there becomes one entry per field, `{parent}.fused_{names}.{field}`: the parts'
    tensors concatenated along `fields[field]` (their output axis), in the group's order.
    Stored fused, they load as one tensor (made from separate ones at load they would
    double their memory for a while: the allocator keeps what the separate ones freed)."""
    first = next(iter(fields))
    for parent in sorted({n.rsplit(".", 2)[0] for n in out}):
        for names in SHARED_INPUT_GROUPS:
            parts = [f"{parent}.{n}" for n in names]
            if all(f"{p}.{first}" in out for p in parts):
                key = f"{parent}.fused_{'_'.join(names)}"
                for field, dim in fields.items():
                    out[f"{key}.{field}"] = torch.cat([out.pop(f"{p}.{field}") for p in parts],
                                                      dim=dim)


def _int4_tensors(gguf_path, config, dtype) -> dict:
    """{name.packed, name.scale_zero} in the int4 kernel's layout, packed once and cached
    (the layout belongs to this torch build: the key names it); q/k/v and gate/up stored
    as one stacked layer each (`_store_fused`)."""
    from . import cache

    stat = Path(gguf_path).stat()
    key = (f"{Path(gguf_path).name}:{stat.st_size}:{int(stat.st_mtime)}:torch {torch.__version__}"
           f":{torch.backends.cpu.get_cpu_capability()}:{dtype}:int4-v2")

    def build() -> dict:
        # groups stacked as GGUF rows, then packed: the kernel's layout interleaves rows in
        # blocks, so packed layers stack only where every part's row count fills its blocks
        rows = {f"{name}.rows": torch.from_numpy(np.array(raw))      # a copy: the cache's
                for name, raw in read_q4_1(gguf_path, config).items()}   # arrays are read-only
        _store_fused(rows, {"rows": 0})
        out = {}
        for key, raw in rows.items():
            name = key[:-len(".rows")]
            q, d, m = (torch.from_numpy(a) for a in q4_1_blocks(raw.numpy()))
            layer = Int4Linear.from_q4_1(q, d, m, dtype)
            out[f"{name}.packed"], out[f"{name}.scale_zero"] = layer.packed, layer.scale_zero
        return out

    return cache.cached_tensors(f"{Path(gguf_path).stem.lower()}-int4-{str(dtype)[6:]}", key, build)


@torch.no_grad()
def int8_weights(model, dtype=torch.float32) -> int:
    """Every linear (and the head) per-channel int8, multiplied in `dtype`. GPT-2's Conv1D
    (a linear stored transposed) included."""
    from transformers.pytorch_utils import Conv1D

    swapped = replace_linears(model, lambda name, lin: Int8Linear.from_linear(lin, dtype),
                              skip={"lm_head"})
    for module in list(model.modules()):
        for attr, sub in list(module.named_children()):
            if isinstance(sub, Conv1D):                       # weight (K, N): y = x @ W + b
                q, scales = quantize_int8(sub.weight.detach().float().T)
                setattr(module, attr, Int8Linear(q, scales.to(dtype), sub.bias))
                swapped += 1
    _int8_head(model, dtype)
    return swapped


_twins: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _sharing_copy(module: nn.Module) -> nn.Module:
    """A new module tree of `module` holding the very same parameter and buffer tensors."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=shared)


@torch.no_grad()
def scoring_twin(model, tensors: dict) -> nn.Module:
    """Make (once) and return `model`'s scoring twin: the same module tree sharing every
    embedding, norm and buffer tensor, its linears and head `DynamicInt8Linear`, their int8
    weights from `tensors` ({name.qweight, name.scales}, cached: `gguf_twin_tensors`). A
    head already int8 lends its own weights (a two-pass `DynamicInt8Linear` its scales too,
    an `Int8Linear` only its int8: its fp32 scales are in `tensors`); one still fp32 is
    quantised here. The twin adds 106 MB to SmolLM2-135M.
    (Quantising the fp32 linears here instead would page their whole mmapped file in:
    +540 MB of RSS.)"""
    if model in _twins:
        return _twins[model]

    def make(name, module):
        if isinstance(module, DynamicInt8Linear) and module.passes == 1:
            return None                                   # installed from `tensors` above
        if f"{name}.qweight" in tensors:
            return DynamicInt8Linear(tensors[f"{name}.qweight"], tensors[f"{name}.scales"],
                                     getattr(module, "bias", None))
        if isinstance(module, Int8Linear) and f"{name}.scales" in tensors:
            return DynamicInt8Linear(module.qweight, tensors[f"{name}.scales"], module.bias)
        if isinstance(module, DynamicInt8Linear):         # the two-pass head: one pass here
            return DynamicInt8Linear(module.qweight_t.T, module.scales, module.bias)
        if isinstance(module, nn.Linear):
            return DynamicInt8Linear.from_weight(module.weight, module.bias)
        return None

    twin = _sharing_copy(model)
    # q/k/v and gate/up: one product each (its prefill twin, a copy, shares them), from
    # weights stored fused (made from separate ones they would double their memory at load:
    # the allocator keeps what the separate ones freed, +55 MB of RSS): where the model
    # holds them separate (fp32, no 4-bit kernel), installed here; a 4-bit model's fused
    # layer is swapped by `make`, its parts kept
    _install_stored(twin, tensors, "qweight", lambda key, n, k: DynamicInt8Linear(
        tensors[f"{key}.qweight"], tensors[f"{key}.scales"]))
    replace_linears(twin, make, kinds=(nn.Linear, Int4Linear, Int8Linear, DynamicInt8Linear))
    fuse_shared_inputs(twin)                # groups not stored fused
    twin.config.tie_word_embeddings = False
    _twins[model] = twin
    return twin


def gguf_twin_tensors(gguf_path, model) -> dict:
    """The scoring twin's int8 weights for a GGUF-converted Llama, quantised once from the
    Q4_1 blocks (the same numbers as its fp32 weights, without reading those) and cached;
    for an `Int8Linear` head (whose int8 weights `_int8_head` makes), its fp32 scales."""
    from . import cache

    head = model.get_output_embeddings()
    stat = Path(gguf_path).stat()
    key = (f"{Path(gguf_path).name}:{stat.st_size}:{int(stat.st_mtime)}:"
           f"{type(head).__name__}:int8-twin-v3")

    def build() -> dict:
        out = {}
        for name, raw in read_q4_1(gguf_path, model.config).items():
            out[f"{name}.qweight"], out[f"{name}.scales"] = quantize_int8(dequantized(raw))
        _store_fused(out, {"qweight": 0, "scales": 0})
        if isinstance(head, nn.Linear):
            out["lm_head.qweight"], out["lm_head.scales"] = quantize_int8(head.weight.detach())
        elif isinstance(head, Int8Linear):   # int8 already (from the tied table): the same
            # rounding's fp32 scales (a `DynamicInt8Linear` head has its own already)
            out["lm_head.scales"] = int8_scales(model.get_input_embeddings().weight.detach())
        return out

    return cache.cached_tensors(f"{Path(gguf_path).stem.lower()}-int8-twin", key, build)


def scoring_model(model) -> nn.Module:
    """The module text scoring runs on: `model`'s twin if it has one, else `model`."""
    return _twins.get(model, model)


_prefill_twins: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prefill_twin(model) -> nn.Module | None:
    """Make (once) and return the module a prompt's forward runs on: a twin of `model` whose
    linears multiply int8 by int8 in two passes (the accuracy of int8 weights with exact
    activations), on int8 weights it already holds: its scoring twin's (a 4-bit model) or
    its own `Int8Linear`s' (no copy; fp32 scales and biases only). None when it has
    neither. Many tokens at once are where the weight-only kernels' cost grows with every
    row; decoding stays on them. SmolLM2 4-bit on one thread: 32 tokens 130 -> 84 ms, 128
    tokens 475 -> 273, 512 tokens 1989 -> 1170 (8 tokens 47 -> 52); GPT-2 base shape int8 on
    two threads: 16 tokens 40 -> 27 ms, 400 tokens 641 -> 289 (fp32 334)."""
    if model in _prefill_twins:
        return _prefill_twins[model]
    source = _twins.get(model)
    if source is None and not any(isinstance(m, Int8Linear) for m in model.modules()):
        return None
    runner = _sharing_copy(model if source is None else source)

    def make(name, module):
        if isinstance(module, Int8Linear):
            return DynamicInt8Linear(module.qweight, module.scales.float(), module.bias, 2)
        module.passes = 2                                   # a DynamicInt8Linear: its copy
        return None

    replace_linears(runner, make, kinds=(Int8Linear, DynamicInt8Linear))
    _prefill_twins[model] = runner
    return runner


def prefill_model(model) -> nn.Module:
    """The module a prompt's forward runs on: `prefill_twin`'s if made, else `model`."""
    return _prefill_twins.get(model, model)


def dequantized(raw: np.ndarray) -> torch.Tensor:
    """(N, K) fp32 weight of raw Q4_1 rows, w = d*q + m (for checks)."""
    q, d, m = (torch.as_tensor(a) for a in q4_1_blocks(raw))
    n, k = q.shape
    return (q.float().reshape(n, -1, 32) * d[..., None] + m[..., None]).reshape(n, k)


__all__ = ["from_gguf_q4_1", "int8_weights", "scoring_twin", "scoring_model", "prefill_twin",
           "prefill_model",
           "gguf_twin_tensors", "read_q4_1", "q4_1_blocks", "dequantized", "quantize_int8"]
