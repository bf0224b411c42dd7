"""Heatmaps as PIL images, drawn with matplotlib's object API (no pyplot global state)."""

import io

import numpy as np
from PIL import Image


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _to_image(fig) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    # without clear() a constrained-layout figure keeps memory after it is dropped (about
    # 0.3 MB per heatmap in a server that draws on every request)
    fig.clear()
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def attention_heatmap(weights, tokens: list, title: str) -> Image.Image:
    """(T, T) weights: rows are the attending tokens (queries), columns the attended (keys)."""
    w = np.asarray(weights, dtype=np.float32)
    size = min(12.0, 3.0 + 0.28 * len(tokens))
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-6))
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=8)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
    ax.set_xlabel("attended token (key)")
    ax.set_ylabel("attending token (query)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="attention weight")
    return _to_image(fig)


def heads_grid(weights, title: str) -> Image.Image:
    """(H, T, T) weights of one layer as small multiples, one per head."""
    w = np.asarray(weights, dtype=np.float32)
    heads = w.shape[0]
    cols = min(heads, 6)
    rows = (heads + cols - 1) // cols
    fig = _figure(2.0 * cols, 2.1 * rows + 0.4)
    fig.suptitle(title, fontsize=10)
    for h in range(heads):
        ax = fig.add_subplot(rows, cols, h + 1)
        ax.imshow(w[h], cmap="viridis", vmin=0.0)
        ax.set_title(f"head {h + 1}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return _to_image(fig)


def positional_encoding(table, title: str) -> Image.Image:
    """(positions, d_model) sinusoidal table."""
    t = np.asarray(table, dtype=np.float32)
    fig = _figure(9, 4)
    ax = fig.add_subplot()
    im = ax.imshow(t, cmap="RdBu", aspect="auto", vmin=-1, vmax=1)
    ax.set_xlabel("embedding dimension (even: sin, odd: cos)")
    ax.set_ylabel("position")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax)
    return _to_image(fig)
