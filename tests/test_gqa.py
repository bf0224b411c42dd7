"""Grouped-query attention under a padding mask (mmcore/gqa.py): one grouped SDPA call on
the CPU, the same numbers as transformers' own SDPA path, and only for the models it fits."""

import copy

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

from mmcore import gqa, hub, lm_scoring, tiny


def tiny_llama(folder=None, kv_heads=2):
    tok = AutoTokenizer.from_pretrained(tiny.folder("gpt2"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    if folder is not None:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return model, tok


def sdpa_calls(monkeypatch) -> list:
    """The keyword arguments of every SDPA call from here on."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), **kwargs})
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def padded_batch(model):
    """Three left-padded prompts of 3, 5 and 7 tokens, prefilled, then two decode steps:
    ((3, V) logits of each, the (3, T) mask)."""
    rows = [[5, 9, 2], [7, 1, 4, 4, 8], [3, 3, 6, 2, 9, 1, 5]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out, cache = [], DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1)
                       .clamp(min=0), cache=cache, use_cache=True).logits[:, -1]
        out.append(logits)
        pos = mask.sum(-1)
        for _ in range(2):
            mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
            logits = model(input_ids=logits.argmax(-1)[:, None], attention_mask=mask,
                           position_ids=pos[:, None], cache=cache, use_cache=True).logits[:, -1]
            out.append(logits)
            pos = pos + 1
    return out, mask


def test_a_loaded_grouped_query_lm_runs_grouped_sdpa(tmp_path):
    tiny_llama(tmp_path)
    model, _ = hub.load_role("causal_lm", str(tmp_path), "cpu")
    assert model.config._attn_implementation == gqa.NAME


@pytest.mark.parametrize("kv_heads", [4])
def test_models_without_grouped_heads_keep_their_attention(tmp_path, kv_heads):
    tiny_llama(tmp_path, kv_heads=kv_heads)
    model, _ = hub.load_role("causal_lm", str(tmp_path), "cpu")
    assert model.config._attn_implementation == "sdpa"
    gpt2, _ = hub.load_role("causal_lm", str(tiny.folder("gpt2")), "cpu")
    assert gpt2.config._attn_implementation == "sdpa"
    eager, _ = tiny_llama()
    eager.set_attn_implementation("eager")
    assert not gqa.use_grouped_sdpa(eager)
    assert eager.config._attn_implementation == "eager"


def test_masked_steps_are_one_grouped_call_with_transformers_numbers(monkeypatch):
    ref, _ = tiny_llama()
    ours = copy.deepcopy(ref)
    assert gqa.use_grouped_sdpa(ours)
    want, _ = padded_batch(ref)
    calls = sdpa_calls(monkeypatch)
    got, mask = padded_batch(ours)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    # every call (prompts and steps, 2 layers each) grouped the 4 query heads over 2 kv heads
    # with the padding mask, keys and values not copied per head
    assert len(calls) == 6
    assert all(c.get("enable_gqa") and c.get("attn_mask") is not None for c in calls)
    assert all(c["q"][1] == 4 and c["k"][1] == 2 for c in calls)


def test_a_row_of_the_masked_batch_equals_that_prompt_alone():
    model, _ = tiny_llama()
    assert gqa.use_grouped_sdpa(model)
    batch, _ = padded_batch(model)
    rows = [[5, 9, 2], [7, 1, 4, 4, 8], [3, 3, 6, 2, 9, 1, 5]]
    for i, row in enumerate(rows):
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([row]), cache=cache,
                           use_cache=True).logits[:, -1]
            alone = [logits]
            for _ in range(2):
                logits = model(input_ids=logits.argmax(-1)[:, None], cache=cache,
                               use_cache=True).logits[:, -1]
                alone.append(logits)
        for b, a in zip(batch, alone):
            torch.testing.assert_close(b[i], a[0], rtol=0, atol=1e-5)


def test_unmasked_calls_stay_on_transformers_path(monkeypatch):
    model, _ = tiny_llama()
    assert gqa.use_grouped_sdpa(model)
    calls = sdpa_calls(monkeypatch)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[5, 9, 2, 7]]))
    # no mask: transformers' own call (causal, grouped by its own rule)
    assert calls and all(c.get("attn_mask") is None and c.get("is_causal") for c in calls)


def test_scoring_runs_on_the_grouped_path_with_transformers_numbers():
    """Candidate scoring's tree forward (a 4D mask) on the grouped path."""
    ref, tok = tiny_llama()
    ours = copy.deepcopy(ref)
    assert gqa.use_grouped_sdpa(ours)
    conts = [[5, 9], [7, 1, 4], [3], [8, 8, 8, 2]]
    got, want = ([t for t in lm_scoring.score_continuations(
        m, lm_scoring.run_prefix(m, tok, "the cat sat on"), conts)] for m in (ours, ref))
    assert got == pytest.approx(want, abs=1e-5)


def test_only_families_that_never_test_the_implementations_name_are_switched():
    """Gemma 4's code checks `_attn_implementation == "sdpa"` (its shared-KV layers): under
    another name its logits change, so it and families like it stay on SDPA."""
    import importlib
    import inspect

    for family in gqa.FAMILIES:
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        assert '"sdpa"' not in inspect.getsource(module), family
    gemma4 = importlib.import_module("transformers.models.gemma4.modeling_gemma4")
    assert '"sdpa"' in inspect.getsource(gemma4)         # the case the list guards against

    class Other:
        config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2)

    Other.config._attn_implementation = "sdpa"
    Other.config.model_type = "gemma4_text"
    assert not gqa.use_grouped_sdpa(Other())
