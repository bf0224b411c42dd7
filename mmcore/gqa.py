"""Grouped-query attention with a padding mask, as one SDPA call on the CPU.

transformers' SDPA path (`integrations/sdpa_attention.py`) lets PyTorch's SDPA group the
query heads over their key/value heads (`enable_gqa`) only when there is no attention mask,
because CUDA's fast kernels take no mask then. With a mask (a batch of left-padded streams,
a batch of prompts of unequal lengths) a one-token query is instead folded into the kv
heads (`pack_gqa`: (B, 9, 1, 64) -> (B, 3, 3, 64)) and longer queries get the keys and values
copied per query head (`repeat_kv`). On the CPU, SDPA's own grouped kernel takes a mask and
is the faster of the three (SmolLM2's 9 query / 3 kv heads, 8 rows, 61 positions, 2 threads:
34 us against 59-65 folded; transformers' numbers, tested to 1e-5).

`use_grouped_sdpa(model)` switches a loaded model whose config asks for SDPA and has fewer
kv heads than query heads to `mmcore_sdpa`: that path for a masked CPU call, transformers'
own SDPA for every other call (no mask, a GPU, softcapping, a position bias). It is one
model's setting (its config's attention implementation), not the process's: transformers'
only other switch is the environment variable TRANSFORMERS_SDPA_FORCE_GQA. Only the model
families in `FAMILIES` are switched: some others' code tests the implementation's name
(Gemma 4's shared-KV layers check `== "sdpa"` and, under another name, cut their queries
without a mask: other logits when more than the last position is kept).
"""

import threading

import torch

NAME = "mmcore_sdpa"
# decoder families whose modeling code never tests the attention implementation's name
# (tests/test_gqa.py checks each one's source for it)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2", "granite",
            "starcoder2", "gemma", "cohere")
_registered = threading.Lock()
_sdpa = []                  # transformers' own sdpa_attention_forward, once registered


def grouped_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling: float | None = None, is_causal: bool | None = None,
                         **kwargs):
    """transformers' attention-function signature: ((B, T, H, D) output, None)."""
    if (attention_mask is None or query.device.type != "cpu"
            or getattr(module, "num_key_value_groups", 1) <= 1
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
            or kwargs.get("output_attentions", False)
            or key.shape[-1] != value.shape[-1]):
        return _sdpa[0](module, query, key, value, attention_mask, dropout=dropout,
                        scaling=scaling, is_causal=is_causal, **kwargs)
    # a mask is given, so the call is not causal by flag (transformers' own rule)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=False, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `NAME` known to transformers (once per process): the attention function, and
    SDPA's mask builder for its masks."""
    with _registered:
        if _sdpa:
            return
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, grouped_sdpa_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _sdpa.append(sdpa_attention_forward)


def use_grouped_sdpa(model) -> bool:
    """Switch `model` to `NAME` where it runs SDPA with grouped kv heads; True if it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or \
            getattr(config, "model_type", None) not in FAMILIES:
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not heads or kv_heads >= heads:
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, TypeError):     # a model class that cannot switch: keep its SDPA
        return False
    return config._attn_implementation == NAME
