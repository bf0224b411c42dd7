"""The from-scratch Transformer equals PyTorch's own layers (float64, 1e-10), masks included."""

import math

import pytest
import torch
from torch import nn

from mmcore import transformer as T

D, H, FF, B, TGT, SRC = 16, 4, 32, 3, 5, 7


def cfg(norm_first=False, n_layers=1):
    return T.TransformerConfig(d_model=D, n_heads=H, d_ff=FF, n_layers=n_layers, dropout=0.0,
                               norm_first=norm_first)


def torch_enc(norm_first):
    # train mode with dropout 0: no "fast path" (which zeroes padded rows), same maths
    return nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True,
                                      norm_first=norm_first, dtype=torch.float64).train()


def torch_dec(norm_first):
    return nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, batch_first=True,
                                      norm_first=norm_first, dtype=torch.float64).train()


def padding(lengths, size):
    return torch.arange(size).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)   # (B, size)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("masks", ["none", "causal", "padding", "both", "float"])
def test_encoder_layer_equals_torch(norm_first, masks):
    theirs = torch_enc(norm_first)
    ours = T.EncoderLayer(cfg(norm_first)).double()
    T.load_torch_layer(ours, theirs)
    x = torch.randn(B, SRC, D, dtype=torch.float64)
    mask = pad = None
    if masks in ("causal", "both"):
        mask = T.causal_mask(SRC)
    if masks == "float":
        mask = torch.randn(SRC, SRC, dtype=torch.float64)
    if masks in ("padding", "both"):
        pad = padding([SRC, 4, 2], SRC)
    want = theirs(x, src_mask=mask, src_key_padding_mask=pad)
    got = ours(x, src_mask=mask, src_key_padding_mask=pad)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_equals_torch(norm_first):
    theirs = torch_dec(norm_first)
    ours = T.DecoderLayer(cfg(norm_first)).double()
    T.load_torch_layer(ours, theirs)
    x = torch.randn(B, TGT, D, dtype=torch.float64)
    memory = torch.randn(B, SRC, D, dtype=torch.float64)
    kwargs = dict(tgt_mask=T.causal_mask(TGT), tgt_key_padding_mask=padding([TGT, 3, 4], TGT),
                  memory_key_padding_mask=padding([SRC, 5, 2], SRC))
    torch.testing.assert_close(ours(x, memory, **kwargs), theirs(x, memory, **kwargs),
                               rtol=0, atol=1e-10)


def test_stacks_equal_torch():
    enc_t = nn.TransformerEncoder(torch_enc(False), num_layers=3, enable_nested_tensor=False)
    dec_t = nn.TransformerDecoder(torch_dec(False), num_layers=3)
    enc, dec = T.Encoder(cfg(n_layers=3)).double(), T.Decoder(cfg(n_layers=3)).double()
    for a, b in zip(enc.layers, enc_t.layers):
        T.load_torch_layer(a, b)
    for a, b in zip(dec.layers, dec_t.layers):
        T.load_torch_layer(a, b)
    src = torch.randn(B, SRC, D, dtype=torch.float64)
    tgt = torch.randn(B, TGT, D, dtype=torch.float64)
    memory = enc(src)
    torch.testing.assert_close(memory, enc_t(src), rtol=0, atol=1e-10)
    torch.testing.assert_close(dec(tgt, memory, tgt_mask=T.causal_mask(TGT)),
                               dec_t(tgt, memory, tgt_mask=T.causal_mask(TGT)), rtol=0, atol=1e-10)


def test_multi_head_attention_weights_equal_torch():
    theirs = nn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64)
    ours = T.MultiHeadAttention(D, H).double()
    T.load_torch_attention(ours, theirs)
    q = torch.randn(B, TGT, D, dtype=torch.float64)
    kv = torch.randn(B, SRC, D, dtype=torch.float64)
    pad = padding([SRC, 6, 3], SRC)
    want, want_w = theirs(q, kv, kv, key_padding_mask=pad, average_attn_weights=False)
    got, got_w = ours(q, kv, kv, key_padding_mask=pad)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-10)
    assert got_w.shape == (B, H, TGT, SRC)
    torch.testing.assert_close(got_w.sum(-1), torch.ones(B, H, TGT, dtype=torch.float64))
    assert float(got_w[2, :, :, 3:].detach().abs().max()) == 0.0  # padding never attended


def test_scaled_dot_product_matches_torch_and_rows_sum_to_one():
    q, k, v = (torch.randn(B, H, n, 8, dtype=torch.float64) for n in (TGT, SRC, SRC))
    out, w = T.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, nn.functional.scaled_dot_product_attention(q, k, v),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, TGT, dtype=torch.float64))


def test_causal_mask_blocks_the_future():
    layer = T.EncoderLayer(cfg()).double()
    x = torch.randn(1, SRC, D, dtype=torch.float64, requires_grad=True)
    out = layer(x, src_mask=T.causal_mask(SRC))
    probe = torch.randn(D, dtype=torch.float64)    # a plain sum of a LayerNorm output is constant
    for t in range(SRC):
        (grad,) = torch.autograd.grad(out[0, t] @ probe, x, retain_graph=True)
        assert float(grad[0, t + 1:].abs().sum()) == 0.0
        assert float(grad[0, : t + 1].abs().max()) > 0.0


def test_positional_encoding_formula():
    table = T.sinusoidal_table(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert math.isclose(table[pos, 2 * i], math.sin(angle), abs_tol=1e-6)
            assert math.isclose(table[pos, 2 * i + 1], math.cos(angle), abs_tol=1e-6)
    x = torch.zeros(2, 10, 16)
    torch.testing.assert_close(T.PositionalEncoding(16)(x)[1], table[:10])


def test_dropout_only_in_training():
    layer = T.EncoderLayer(T.TransformerConfig(d_model=D, n_heads=H, d_ff=FF, dropout=0.5))
    x = torch.randn(2, SRC, D)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_bad_head_count_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        T.MultiHeadAttention(10, 3)
