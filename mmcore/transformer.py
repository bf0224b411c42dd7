"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), written out plainly.

Shapes: B batch, T / S target / source length, D d_model, h heads, d_k = D / h.
Masks follow PyTorch's conventions so these layers drop in for torch.nn's:
- `attn_mask`: (T, S) or (B*h, T, S); bool True = may NOT attend, or float added to scores;
- `key_padding_mask`: (B, S) bool, True = padding (never attended to).
Layer and parameter names match torch.nn.Transformer*Layer's, so weights copy across
(`load_torch_layer`); the tests prove the outputs equal in float64.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class TransformerConfig:
    d_model: int = 512          # width of every token vector (the paper's base model)
    n_heads: int = 8            # attention heads; d_k = d_v = d_model / n_heads
    d_ff: int = 2048            # inner width of the position-wise feed-forward
    n_layers: int = 6           # layers in each stack
    dropout: float = 0.1        # after attention, feed-forward and positional encoding
    norm_first: bool = False    # False: post-norm as in the paper; True: pre-norm
    layer_norm_eps: float = 1e-5


def causal_mask(size: int, device=None) -> torch.Tensor:
    """(T, T) bool, True above the diagonal: position t may not attend to positions > t."""
    return torch.ones(size, size, dtype=torch.bool, device=device).triu(1)


def scaled_dot_product_attention(q, k, v, mask=None, dropout_p: float = 0.0):
    """softmax(Q K^T / sqrt(d_k)) V.

    q: (..., T, d_k), k: (..., S, d_k), v: (..., S, d_v); mask broadcastable to (..., T, S),
    bool True = blocked, or float added to the scores.
    Returns (output (..., T, d_v), weights (..., T, S)); each row of weights sums to 1.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))              # (..., T, S)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask
    weights = scores.softmax(dim=-1)
    attended = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return attended @ v, weights


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W^Q_i, K W^K_i, V W^V_i)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads, self.d_k, self.dropout = n_heads, d_model // n_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape                                                   # (B, T, D)
        return x.view(b, t, self.n_heads, self.d_k).transpose(1, 2)         # (B, h, T, d_k)

    def forward(self, query, key, value, attn_mask=None, key_padding_mask=None):
        """query (B, T, D), key/value (B, S, D) -> (output (B, T, D), weights (B, h, T, S))."""
        b, t, _ = query.shape
        s = key.size(1)
        q, k, v = self.split(self.q_proj(query)), self.split(self.k_proj(key)), \
            self.split(self.v_proj(value))
        mask = None
        if attn_mask is not None:
            mask = attn_mask.view(b, self.n_heads, t, s) if attn_mask.dim() == 3 else attn_mask
        if key_padding_mask is not None:
            pad = key_padding_mask.view(b, 1, 1, s)                         # (B, 1, 1, S)
            if mask is None:
                mask = pad
            elif mask.dtype == torch.bool:
                mask = mask | pad
            else:
                mask = mask.masked_fill(pad, float("-inf"))
        out, weights = scaled_dot_product_attention(q, k, v, mask,
                                                    self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, t, -1)                         # (B, T, D)
        return self.out_proj(out), weights


class PositionalEncoding(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(pos / 10000^(2i/D)); added."""

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                      # (B, T, D)
        return self.dropout(x + self.pe[: x.size(1)].to(x.dtype))


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """(max_len, d_model) table of the sinusoidal positional encoding."""
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)           # (L, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)                # (D/2,)
    angle = pos / torch.pow(10000.0, two_i / d_model)                        # (L, D/2)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.float()


class EncoderLayer(nn.Module):
    """Self-attention then FFN(x) = max(0, x W1 + b1) W2 + b2, each wrapped in
    residual + LayerNorm (post-norm; pre-norm with norm_first) and dropout."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.dropout = nn.Dropout(cfg.dropout)
        self.linear2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.dropout)

    def feed_forward(self, x):
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def attend(self, x, mask, padding):
        return self.dropout1(self.self_attn(x, x, x, mask, padding)[0])

    def forward(self, x, src_mask=None, src_key_padding_mask=None):          # (B, T, D)
        if self.norm_first:
            x = x + self.attend(self.norm1(x), src_mask, src_key_padding_mask)
            return x + self.feed_forward(self.norm2(x))
        x = self.norm1(x + self.attend(x, src_mask, src_key_padding_mask))
        return self.norm2(x + self.feed_forward(x))


class DecoderLayer(EncoderLayer):
    """Masked self-attention, cross-attention over the encoder's memory, then the FFN; each
    wrapped in residual + LayerNorm and dropout. The encoder layer's parts plus the cross
    attention and a third norm (names as torch.nn.TransformerDecoderLayer's)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg)
        self.multihead_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm3 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout3 = nn.Dropout(cfg.dropout)

    def forward(self, x, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None):                             # x (B, T, D), memory (B, S, D)
        def self_block(y):
            return self.attend(y, tgt_mask, tgt_key_padding_mask)

        def cross_block(y):
            return self.dropout2(self.multihead_attn(y, memory, memory, memory_mask,
                                                     memory_key_padding_mask)[0])

        def ff_block(y):
            return self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(y)))))

        if self.norm_first:
            x = x + self_block(self.norm1(x))
            x = x + cross_block(self.norm2(x))
            return x + ff_block(self.norm3(x))
        x = self.norm1(x + self_block(x))
        x = self.norm2(x + cross_block(x))
        return self.norm3(x + ff_block(x))


class Encoder(nn.Module):
    """N encoder layers (plus a final LayerNorm in pre-norm, where the last output is unnormed)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(self, x, mask=None, src_key_padding_mask=None):
        for layer in self.layers:
            x = layer(x, mask, src_key_padding_mask)
        return self.norm(x) if self.norm is not None else x


class Decoder(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(self, x, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None):
        for layer in self.layers:
            x = layer(x, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                      memory_key_padding_mask)
        return self.norm(x) if self.norm is not None else x


def load_torch_attention(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    """Copy nn.MultiheadAttention's packed in-projection into our separate Q, K, V."""
    d = ours.q_proj.in_features
    with torch.no_grad():
        for i, proj in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
            proj.weight.copy_(theirs.in_proj_weight[i * d:(i + 1) * d])
            proj.bias.copy_(theirs.in_proj_bias[i * d:(i + 1) * d])
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
        ours.out_proj.bias.copy_(theirs.out_proj.bias)


def load_torch_layer(ours: nn.Module, theirs: nn.Module) -> None:
    """Copy a torch.nn.TransformerEncoderLayer / DecoderLayer's weights into ours."""
    for name, module in ours.named_children():
        if isinstance(module, MultiHeadAttention):
            load_torch_attention(module, getattr(theirs, name))
        elif isinstance(module, (nn.Linear, nn.LayerNorm)):
            module.load_state_dict(getattr(theirs, name).state_dict())
