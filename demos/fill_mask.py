"""Fill-mask and next-sentence prediction tab: BERT's two pre-training tasks as probes."""

import re

import gradio as gr

from mmcore import InputError, tables
from mmcore.fill_mask import split_masks
from mmcore.text import as_number

from .context import AppContext, guarded, text_md
from .files import uploaded

TITLE = "Fill mask & NSP"
EXAMPLES = [
    ["The capital of France is [MASK].", 5, ""],
    ["I drink a cup of [MASK] every morning to wake up.", 5, ""],
    ["The opposite of hot is [MASK].", 5, ""],
    ["The [MASK] of France is [MASK].", 5, ""],
    ["The doctor told [MASK] to take the medicine.", 5, "him, her, them"],
    ["My favourite animal is the [MASK].", 5, "kangaroo, cat, elephant"],
]
NSP_EXAMPLES = [
    ["I forgot my umbrella at home this morning.", "By the time I reached the office, I was soaked."],
    ["The bakery on the corner opens at six.", "Whales migrate thousands of kilometres every year."],
]
MAX_BATCH_ROWS = 200


def backend_note(ctx: AppContext) -> str:
    from mmcore.roles import MaskedLM

    spec = ctx.kit.spec("masked_lm")
    if not issubclass(ctx.kit.role_class("masked_lm"), MaskedLM):
        return (f"**Note:** this kit has no masked language model, so **{spec.name}**, a causal "
                "(left-to-right) LM, approximates BERT's task: it proposes words from the text "
                "before the mask and from a fill-in-the-blank question showing the whole "
                "sentence (so the text after the mask counts too), and scores each candidate "
                "sentence by its likelihood read left to right and as the answer to that "
                "question; probabilities are renormalised over the candidates. Next-sentence "
                "probability comes from how much the first sentence raises the likelihood of "
                "the second (pointwise mutual information), calibrated on labelled pairs.")
    return (f"Masked LM: **{spec.name}**. Scores are the model's own probabilities; several "
            "masks are also filled jointly (most confident first, a small beam).")


ROBERTA_MASK = re.compile(r"<mask>", re.IGNORECASE)


def normalise_masks(text):
    """`<mask>` (RoBERTa's spelling, as people paste it) counts as `[MASK]`."""
    return ROBERTA_MASK.sub("[MASK]", text) if isinstance(text, str) else text


def highlighted(text: str, result) -> list:
    """The best joint fill as (text, label) pieces, the filled words labelled."""
    segments = split_masks(text)
    pieces = [(segments[0], None)]
    for word, seg in zip(result.joint[0]["tokens"], segments[1:]):
        pieces += [(word, "filled"), (seg, None)]
    return pieces


def build(ctx: AppContext) -> None:
    def model_menu(role: str, label: str):
        """The kit's model, or one loaded for `role` on the Models tab."""
        choices = lambda: ["base model"] + ctx.loaded_choices(role)          # noqa: E731
        menu = gr.Dropdown(choices(), value="base model", allow_custom_value=True,
                           label=f"{label} (load others on the Models tab)")
        menu.focus(lambda: gr.update(choices=choices()), None, menu, api_visibility="private")
        return menu

    @guarded
    def fill_mask(text: str, top_k: float = 5, targets: str | None = None,
                  model: str = "base model"):
        """Fill every [MASK] in the text: a chart for the first mask, the best sentence
        highlighted, joint fills and per-mask tables."""
        top_k = as_number(top_k, "Top k", 1, 50, integer=True)
        text = normalise_masks(text)
        kit = ctx.role_kit("masked_lm", model)
        result = kit.fill_mask_details(text, top_k, targets or None)
        first = {r["token_str"]: r["score"] for r in result.per_mask[0]}
        joint = [[" | ".join(j["tokens"]), float(f"{j['score']:.4g}"), j["sequence"]]
                 for j in result.joint]
        per_mask = [[m + 1, r["token_str"], round(r["score"], 5)]
                    for m, rows in enumerate(result.per_mask) for r in rows]
        notes = "\n".join(f"- {text_md(n)}" for n in result.notices)
        return first, highlighted(text, result), joint, per_mask, notes

    @guarded
    def next_sentence(first: str, second: str, model: str = "base model"):
        """P(B follows A) and, for contrast, P(A follows B): two numbers, each the probability
        of one order; they are separate questions and need not sum to 1."""
        kit = ctx.role_kit("next_sentence", model)
        return kit.next_sentence(first, second), kit.next_sentence(second, first)

    def nsp_words(p_ab, p_ba) -> str:
        """The two numbers as a sentence (a bare "A then B" read like a class label)."""
        if p_ab is None or p_ba is None:
            return ""
        return (f"**B follows A with probability {p_ab:.3f}** (the model's next-sentence "
                f"head); for contrast, A follows B with probability {p_ba:.3f}. These are two "
                "separate questions: they need not sum to 1.")

    def read_rows(file, columns: list):
        upload = uploaded(file, "CSV file")
        if upload is None:
            raise InputError(f"Upload a CSV file with column(s) {', '.join(columns)}.")
        rows, notices = tables.read_csv(upload.path, columns, MAX_BATCH_ROWS)
        return rows, [f"- {text_md(n)}" for n in notices]

    @guarded
    def fill_mask_batch(file=None, top_k: float = 5, request: gr.Request = None):
        """A CSV of sentences (column `sentence`) in; a CSV of fills out. Yields its progress
        row by row, so Stop (or a client's cancel) ends it between rows."""
        top_k = as_number(top_k, "Top k", 1, 50, integer=True)
        rows, notes = read_rows(file, ["sentence"])
        yield gr.skip(), f"Filling… 0/{len(rows)}"   # first: a cancel is seen only after a yield
        out = []
        for n, row in enumerate(rows):
            try:
                result = ctx.kit.fill_mask_details(normalise_masks(row["sentence"]), top_k)
                out.append({"sentence": row["sentence"], "best": result.joint[0]["sequence"],
                            "fills": " | ".join(result.joint[0]["tokens"]),
                            "score": f"{result.joint[0]['score']:.5f}", "error": ""})
            except InputError as exc:
                out.append({"sentence": row["sentence"], "error": str(exc)})
            yield gr.skip(), f"Filling… {n + 1}/{len(rows)}"
        target = ctx.files.download(request, "fill_mask_results.csv")
        path = tables.write_csv(out, ["sentence", "best", "fills", "score", "error"],
                                target.name, target.parent)
        bad = sum(1 for r in out if r["error"])
        summary = f"{len(out) - bad} filled, {bad} skipped (see the error column)."
        yield path, "\n".join([summary] + notes)

    @guarded
    def next_sentence_batch(file=None, request: gr.Request = None):
        """A CSV of pairs (columns `first`, `second`) in; a CSV of probabilities out,
        yielding its progress pair by pair."""
        rows, notes = read_rows(file, ["first", "second"])
        yield gr.skip(), f"Scoring… 0/{len(rows)}"
        out = []
        for n, row in enumerate(rows):
            try:
                p = ctx.kit.next_sentence(row["first"], row["second"])
                out.append({**row, "p_follows": f"{p:.5f}", "error": ""})
            except InputError as exc:
                out.append({**row, "error": str(exc)})
            yield gr.skip(), f"Scoring… {n + 1}/{len(rows)}"
        target = ctx.files.download(request, "nsp_results.csv")
        path = tables.write_csv(out, ["first", "second", "p_follows", "error"], target.name,
                                target.parent)
        yield path, "\n".join(notes)

    gr.Markdown(backend_note(ctx))
    with gr.Row():
        with gr.Column(scale=3):
            text = gr.Textbox(label="Sentence with [MASK] or <mask> (up to 5 masks)", lines=2,
                              max_length=5000, value=EXAMPLES[0][0])
            with gr.Row():
                top_k = gr.Slider(1, 20, value=5, step=1, label="Top k")
                targets = gr.Textbox(label="Only these words (optional, comma separated)",
                                     max_length=2000)
                mlm = model_menu("masked_lm", "Masked LM")
            fill_btn = gr.Button("Fill", variant="primary")
        with gr.Column(scale=2):
            chart = gr.Label(label="First mask: probabilities", num_top_classes=20)
    best = gr.HighlightedText(label="Best fill", color_map={"filled": "green"})
    notes = gr.Markdown(label="Notes")
    # the joint fills get the full width, most of it for the sentence (it was cut off)
    joint = gr.Dataframe(headers=["fills", "joint probability", "sentence"],
                         label="Joint fills (whole sentence)", interactive=False, wrap=True,
                         column_widths=["20%", "15%", "65%"])
    per_mask = gr.Dataframe(headers=["mask", "word", "probability"],
                            label="Each mask on its own", interactive=False)
    gr.Examples(EXAMPLES, [text, top_k, targets])
    outputs = [chart, best, joint, per_mask, notes]
    fill_btn.click(fill_mask, [text, top_k, targets, mlm], outputs, api_name="fill_mask",
                   **ctx.model_event())
    text.submit(fill_mask, [text, top_k, targets, mlm], outputs, api_visibility="private",
                **ctx.model_event())

    gr.Markdown("### Next sentence prediction")
    with gr.Row():
        sent_a = gr.Textbox(label="Sentence A", max_length=5000, value=NSP_EXAMPLES[0][0])
        sent_b = gr.Textbox(label="Sentence B", max_length=5000, value=NSP_EXAMPLES[0][1])
    nsp_model = model_menu("next_sentence", "NSP model")
    nsp_btn = gr.Button("How likely does B follow A?")
    with gr.Row():
        p_ab = gr.Number(label="P(B follows A)", interactive=False)
        p_ba = gr.Number(label="P(A follows B), for contrast", interactive=False)
    verdict = gr.Markdown(label="Verdict")
    gr.Examples(NSP_EXAMPLES, [sent_a, sent_b])
    nsp_btn.click(next_sentence, [sent_a, sent_b, nsp_model], [p_ab, p_ba],
                  api_name="next_sentence",
                  **ctx.model_event()).success(nsp_words, [p_ab, p_ba], verdict,
                                               api_visibility="private")

    with gr.Accordion("Batch: CSV in, CSV out", open=False):
        gr.Markdown("Sentences: a CSV with a `sentence` column. Pairs: columns `first`, "
                    f"`second`. Up to {MAX_BATCH_ROWS} rows; bad rows are reported, not fatal.")
        with gr.Row():
            batch_file = gr.File(label="CSV file", file_types=[".csv", ".tsv", ".txt"])
            batch_out = gr.File(label="Results")
        batch_notes = gr.Markdown(label="Report")
        with gr.Row():
            fills = gr.Button("Fill every sentence").click(
                fill_mask_batch, [batch_file, top_k], [batch_out, batch_notes],
                api_name="fill_mask_batch", preprocess=False, **ctx.model_event("long"))
            pairs = gr.Button("Score every pair").click(
                next_sentence_batch, [batch_file], [batch_out, batch_notes],
                api_name="next_sentence_batch", preprocess=False, **ctx.model_event("long"))
            gr.Button("Stop", variant="stop").click(None, None, None, cancels=[fills, pairs],
                                                    api_visibility="private")
