"""Inside the Transformer: attention maps of the app's own models, positional encoding and
one attention step of the from-scratch layer worked through."""

import gradio as gr
import pandas as pd

from mmcore import InputError, attention, plots, transformer
from mmcore.text import as_number, clean_text

from .context import AppContext, guarded, text_md

TITLE = "Inside the Transformer"
EXAMPLES = ["The animal didn't cross the street because it was too tired.",
            "The capital of France is Paris.",
            "A photo of a cat sitting on a red sofa."]


SINK_NOTE = ("\n**Why does almost every token attend to “{first}”?** ({n} of {total} here.) "
             "Many heads park the attention they do not need on the first token, an *attention "
             "sink* (Xiao et al., 2023, *Efficient Streaming Language Models with Attention "
             "Sinks*): softmax weights must sum to 1, and the first token, seen by every "
             "position, becomes the place to put them. Pick single heads and later layers to "
             "see the patterns that carry meaning.")


SINK_HINT = ("\nIn trained models most tokens often attend to the first token (here "
             "“{first}”; {n} of {total} do now): an *attention sink*, where heads park the "
             "attention they do not need (Xiao et al., 2023). Pick single heads and later "
             "layers to see the patterns that carry meaning.")


def whole(value, name: str) -> int:
    """A slider value from a client, which may send anything (NaN, inf, text)."""
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name} must be a whole number, not {str(value)[:20]!r}.") from None


def build(ctx: AppContext) -> None:
    labels = list(attention.choices(ctx.kit))

    @guarded
    def show_attention(text: str, model: str, layer: float, head: float):
        """Attention of one model on the text: a heatmap of layer/head (head 0 = mean of the
        heads), every head of that layer, and where each token attends most."""
        if model not in labels:
            raise InputError(f"Choose one of: {', '.join(labels)}.")
        layer = as_number(layer, "Layer", 1, 1000, integer=True)
        head = as_number(head, "Head", 0, 1000, integer=True)
        maps = attention.attention_maps(ctx.kit, attention.choices(ctx.kit)[model], text)
        n_layers, n_heads = maps.weights.shape[:2]
        layer_i = min(layer, n_layers) - 1
        head_i = min(head, n_heads)
        mean = head_i == 0
        w = maps.weights[layer_i].mean(0) if mean else maps.weights[layer_i, head_i - 1]
        which = "mean of all heads" if mean else f"head {head_i}"
        heat = plots.attention_heatmap(w, maps.tokens, f"layer {layer_i + 1}, {which}")
        grid = plots.heads_grid(maps.weights[layer_i], f"layer {layer_i + 1}: every head")
        table = [[t, to, round(v, 3)] for t, to, v in
                 maps.most_attended(layer_i, None if mean else head_i - 1)]
        lines = [f"**{maps.model_name}**: {n_layers} layers × {n_heads} heads, "
                 f"{len(maps.tokens)} tokens. Showing layer {layer_i + 1}, {which}."]
        if layer_i + 1 != layer or head_i != head:
            lines.append(f"- This model has {n_layers} layers and {n_heads} heads; the "
                         "request was brought within them.")
        sink = sum(1 for _, to, _ in table if to == maps.tokens[0])
        if sink * 2 > len(table) or mean:
            note = SINK_NOTE if sink * 2 > len(table) else SINK_HINT
            lines.append(note.format(first=text_md(maps.tokens[0]), n=sink, total=len(table)))
        notes = "\n".join(lines + [f"- {text_md(n)}" for n in maps.notices])
        # a slider's value changes only when it was out of range: the answer to a layer
        # change must not overwrite a head typed meanwhile
        return (heat, grid, table, notes,
                gr.update(maximum=n_layers, **({"value": layer_i + 1} if layer_i + 1 != layer
                                                else {})),
                gr.update(maximum=n_heads, **({"value": head_i} if head_i != head else {})))

    @guarded
    def worked_example(text: str):
        """One attention step of the from-scratch MultiHeadAttention on the first tokens."""
        words = clean_text(text, "Text", 2000).split()[:6]
        ex = attention.worked_example(words)
        n = len(ex["tokens"])
        tokens = ", ".join(text_md(t) for t in ex["tokens"])
        md = (f"Tokens: {tokens}\n\n"
              f"1. Embeddings plus positional encoding: X has shape {ex['x']} (batch, T, d_model).\n"
              f"2. Q = X W^Q, K = X W^K, V = X W^V, split into 2 heads: Q {ex['q']}, "
              f"K {ex['k']}, V {ex['v']} (batch, heads, T, d_k = {ex['d_k']}).\n"
              f"3. Weights = softmax(Q K^T / √{ex['d_k']}): shape (batch, heads, {n}, {n}); "
              "each row sums to 1 (head 1 below).\n"
              f"4. Heads = Weights V: {ex['heads_out']}; concatenated and projected by W^O: "
              f"{ex['out']}.")
        names = [f"{i + 1} {t}" for i, t in enumerate(ex["tokens"])]   # unique column names
        weights = pd.DataFrame([[names[i]] + [round(float(v), 3) for v in row]
                                for i, row in enumerate(ex["weights"])],
                               columns=["query ↓ / key →"] + names)
        pe = plots.positional_encoding(transformer.sinusoidal_table(64, 128),
                                       "sinusoidal positional encoding, 64 positions × 128 dims")
        return md, weights, pe

    gr.Markdown("Attention weights of the models this app runs (eager attention), and the "
                "Transformer of *Attention Is All You Need* written from scratch in "
                "`mmcore.transformer` (tested equal to PyTorch's own layers).")
    with gr.Row():
        # min widths: on a phone each control gets a line of its own (the model was cut)
        text = gr.Textbox(label="Sentence", value=EXAMPLES[0], max_length=2000, scale=3,
                          min_width=320)
        model = gr.Dropdown(labels, value=labels[0], label="Model", scale=2, min_width=320)
    with gr.Row():
        layer = gr.Slider(1, 64, value=1, step=1, label="Layer", min_width=320)
        head = gr.Slider(0, 64, value=0, step=1, label="Head (0 = mean of all heads)",
                         min_width=320)
    show = gr.Button("Show attention", variant="primary")
    notes = gr.Markdown(label="Notes")
    with gr.Row():
        # no label badge: it covered the plots' own titles, which say what each shows
        heat = gr.Image(label="Attention heatmap", show_label=False, type="pil", format="png")
        grid = gr.Image(label="Every head of the layer", show_label=False, type="pil",
                        format="png")
    attends = gr.Dataframe(headers=["token", "attends most to", "weight"], interactive=False,
                           label="Where each token attends most")
    gr.Examples([[e] for e in EXAMPLES], [text])
    outputs = [heat, grid, attends, notes, layer, head]
    show.click(show_attention, [text, model, layer, head], outputs, api_name="attention",
               **ctx.model_event())
    for control in (layer, head):
        # always_last: a head entered while the layer's answer is pending still runs
        control.release(show_attention, [text, model, layer, head], outputs,
                        api_visibility="private", trigger_mode="always_last",
                        **ctx.model_event())

    with gr.Accordion("Positional encoding and one attention step, worked through", open=False):
        run = gr.Button("Work through the first words of the sentence")
        steps = gr.Markdown(label="Steps")
        weights = gr.Dataframe(label="Softmax weights of head 1", interactive=False)
        pe = gr.Image(label="Positional encoding", type="pil", format="png")
        run.click(worked_example, [text], [steps, weights, pe], api_name="worked_example")
