"""Compare tab: one input, two models (or one model, two settings), side by side, with what
differs marked: tokens that differ in generation, rank moves in fill-mask and zero-shot,
results gained and lost in retrieval (overlap@k). Model A and B are the kit's model, a
fine-tuned one, or one loaded on the Models tab (mmcore.compare does the diffing)."""

import gradio as gr

from mmcore import Index, InputError, compare, demo_data, images as mm_images
from mmcore.generation import Generation, SamplingParams
from mmcore.text import as_number, clean_text, parse_words

from .context import AppContext, guarded, text_md
from .files import uploaded
from .retrieval import DEMO

TITLE = "Compare"
MARKS = {"changed": "#f4a261"}
RANK_HEADERS = ["item", "rank A", "score A", "rank B", "score B", "move"]


def rank_rows(a, b, prefix=()) -> list:
    return [[*prefix, r["item"], r["rank_a"], _round(r["score_a"]), r["rank_b"],
             _round(r["score_b"]), r["move"]] for r in compare.ranks(a, b)]


def _round(x):
    return None if x is None else round(x, 4)


def model_menus(choices: list, label: str):
    with gr.Row():
        # the handlers check the names (models appear while the app runs)
        a = gr.Dropdown(choices, value=choices[0], label=f"{label} A", allow_custom_value=True)
        b = gr.Dropdown(choices, value=choices[0], label=f"{label} B", allow_custom_value=True)
    return a, b


def build(ctx: AppContext) -> None:
    gr.Markdown("Run one input through **A** and **B**: two models, or one model with two "
                "settings. Models loaded on the Models tab appear as \"loaded: NAME\".")
    lm_choices = lambda: ["base model"] + ctx.loaded_choices("causal_lm")        # noqa: E731
    mlm_choices = lambda: ["base model"] + ctx.loaded_choices("masked_lm")       # noqa: E731
    nsp_choices = lambda: ["base model"] + ctx.loaded_choices("next_sentence")   # noqa: E731
    indexes: dict = {}            # encoder identity -> Index of the demo photos (server data)

    @guarded
    def compare_generate(prompt: str, model_a: str = "base model", model_b: str = "base model",
                         temperature_a: float = 0.0, temperature_b: float = 0.0,
                         max_new_tokens: float = 32, seed: float = 0):
        """Greedy or sampled continuations of one prompt by A and B with the same seed; tokens
        that differ are marked. Returns (A tokens, B tokens, summary)."""
        prompt = clean_text(prompt, "Prompt")
        n = as_number(max_new_tokens, "Max new tokens", 1, 256, integer=True)
        seed = as_number(seed, "Seed", 0, 2**63 - 1, integer=True)
        outs = []
        for choice, temperature in ((model_a, temperature_a), (model_b, temperature_b)):
            kit = ctx.role_kit("causal_lm", choice)
            params = SamplingParams(n, as_number(temperature, "Temperature", 0, 5), seed=seed)
            run = Generation(params.check())
            for _ in kit.generate_tokens(prompt, run.params, run=run):
                pass
            outs.append([t.text for t in run.tokens])
        diff = compare.tokens(*outs)
        where = ("identical" if diff.first_difference is None else
                 f"first difference at token {diff.first_difference + 1}")
        summary = f"A: {len(outs[0])} tokens, B: {len(outs[1])} tokens; {where}; " \
                  f"{diff.same_share:.0%} of tokens shared."
        as_marks = lambda side: [(t, None if m == "same" else m) for t, m in side]   # noqa
        return as_marks(diff.a), as_marks(diff.b), summary

    @guarded
    def compare_fill_mask(text: str, model_a: str = "base model", model_b: str = "base model",
                          top_k: float = 5):
        """Fill-mask candidates of A and B per mask, with each word's rank move."""
        text = clean_text(text, "Text").replace("<mask>", "[MASK]")
        k = as_number(top_k, "Top k", 1, 50, integer=True)
        a = ctx.role_kit("masked_lm", model_a).fill_mask(text, k)
        b = ctx.role_kit("masked_lm", model_b).fill_mask(text, k)
        rows = [row for i, (x, y) in enumerate(zip(a, b))
                for row in rank_rows(x, y, prefix=(i + 1,))]
        top = "; ".join(f"mask {i + 1}: A {text_md(x[0]['token_str'])}, B "
                        f"{text_md(y[0]['token_str'])}" for i, (x, y) in enumerate(zip(a, b)))
        return rows, f"Best words: {top}."

    @guarded
    def compare_next_sentence(first: str, second: str, model_a: str = "base model",
                              model_b: str = "base model"):
        """P(second follows first) by A and by B."""
        first, second = clean_text(first, "Sentence A"), clean_text(second, "Sentence B")
        pa = ctx.role_kit("next_sentence", model_a).next_sentence(first, second)
        pb = ctx.role_kit("next_sentence", model_b).next_sentence(first, second)
        return pa, pb, f"B says {pb - pa:+.3f} against A."

    @guarded
    def compare_zero_shot(image, labels: str, model_a: str = "base model",
                          model_b: str = "base model", template_a: str = "a photo of {}.",
                          template_b: str = "a photo of {}."):
        """Zero-shot label ranks of A and B on one image (softmax scores), with rank moves."""
        upload = uploaded(image, "image")
        if upload is None:
            raise InputError("Upload an image.")
        photo = mm_images.load_image(upload.path)
        words = parse_words(labels, "Labels")
        if len(words) < 2:
            raise InputError("Give at least two labels, separated by commas.")
        a = ctx.kit_for(model_a).zero_shot(photo, words, template_a or "a photo of {}.")
        b = ctx.kit_for(model_b).zero_shot(photo, words, template_b or "a photo of {}.")
        verdict = "agree" if a[0][0] == b[0][0] else "disagree"
        return rank_rows(a, b), (f"A says **{text_md(a[0][0])}**, B says "
                                 f"**{text_md(b[0][0])}**: they {verdict}.")

    def demo_index(kit) -> Index:
        encoder = kit.encoder()
        if encoder.identity not in indexes:
            paths = demo_data.photo_files(ctx.work_dir / "photos", DEMO)
            indexes[encoder.identity] = Index.build(kit, paths, list(DEMO.values()),
                                                    ids=[p.stem for p in paths])
        return indexes[encoder.identity]

    @guarded
    def compare_retrieval(query: str, model_a: str = "base model",
                          model_b: str = "base model", k: float = 5):
        """Search the demo photos with one text by A and B: overlap@k, results gained and
        lost, and each result's rank in both."""
        query = clean_text(query, "Query")
        k = as_number(k, "k", 1, len(DEMO), integer=True)
        a = demo_index(ctx.kit_for(model_a)).search(text=query, k=k)
        b = demo_index(ctx.kit_for(model_b)).search(text=query, k=k)
        diff = compare.retrieval(a, b, k)
        score_a, score_b = dict(a), dict(b)
        rows = [[pid, ra, _round(score_a[pid]), rb, _round(score_b[pid]), "in both"]
                for pid, ra, rb in diff.kept]
        rows += [[pid, None, None, [x for x, _ in b].index(pid) + 1, _round(score_b[pid]),
                  "gained by B"] for pid in diff.gained]
        rows += [[pid, [x for x, _ in a].index(pid) + 1, _round(score_a[pid]), None, None,
                  "lost by B"] for pid in diff.lost]
        return rows, f"overlap@{k}: **{diff.overlap:.0%}** ({len(diff.kept)} of {k} shared)."

    with gr.Tab("Generate A/B"):
        prompt = gr.Textbox("The capital of France is", label="Prompt")
        lm_a, lm_b = model_menus(lm_choices(), "Model")
        with gr.Row():
            temp_a = gr.Slider(0, 2, 0, step=0.05, label="Temperature A")
            temp_b = gr.Slider(0, 2, 0, step=0.05, label="Temperature B")
            length = gr.Slider(1, 256, 32, step=1, label="Max new tokens")
            seed = gr.Number(0, precision=0, label="Seed (both)")
        go = gr.Button("Compare", variant="primary")
        with gr.Row():
            out_a = gr.HighlightedText(label="A (differences marked)", color_map=MARKS,
                                       combine_adjacent=False, show_legend=False,
                                       show_inline_category=False)
            out_b = gr.HighlightedText(label="B (differences marked)", color_map=MARKS,
                                       combine_adjacent=False, show_legend=False,
                                       show_inline_category=False)
        gen_summary = gr.Markdown(label="Summary")
        go.click(compare_generate, [prompt, lm_a, lm_b, temp_a, temp_b, length, seed],
                 [out_a, out_b, gen_summary], api_name="compare_generate",
                 **ctx.model_event("generate"))
        for menu in (lm_a, lm_b):
            menu.focus(lambda: gr.update(choices=lm_choices()), None, menu,
                       api_visibility="private")
    with gr.Tab("Fill mask & NSP A/B"):
        text = gr.Textbox("The capital of France is [MASK].", label="Text with [MASK] or <mask>")
        mlm_a, mlm_b = model_menus(mlm_choices(), "Model")
        top_k = gr.Slider(1, 20, 5, step=1, label="Top k")
        go = gr.Button("Compare", variant="primary")
        fill_table = gr.Dataframe(headers=["mask"] + RANK_HEADERS, interactive=False,
                                  label="Candidates and their rank moves")
        fill_summary = gr.Markdown(label="Summary")
        go.click(compare_fill_mask, [text, mlm_a, mlm_b, top_k], [fill_table, fill_summary],
                 api_name="compare_fill_mask", **ctx.model_event("short"))
        with gr.Row():
            first = gr.Textbox("The cat sat on the mat.", label="Sentence 1")
            second = gr.Textbox("Then it fell asleep.", label="Sentence 2")
        nsp_a, nsp_b = model_menus(nsp_choices(), "NSP model")
        go_nsp = gr.Button("Compare next sentence")
        with gr.Row():
            p_a = gr.Number(label="A: P(2 follows 1)", precision=4)
            p_b = gr.Number(label="B: P(2 follows 1)", precision=4)
        nsp_summary = gr.Markdown(label="NSP summary")
        go_nsp.click(compare_next_sentence, [first, second, nsp_a, nsp_b],
                     [p_a, p_b, nsp_summary], api_name="compare_next_sentence",
                     **ctx.model_event("short"))
        for menu in (mlm_a, mlm_b):
            menu.focus(lambda: gr.update(choices=mlm_choices()), None, menu,
                       api_visibility="private")
        for menu in (nsp_a, nsp_b):
            menu.focus(lambda: gr.update(choices=nsp_choices()), None, menu,
                       api_visibility="private")
    with gr.Tab("Zero-shot A/B"):
        with gr.Row():
            image = gr.Image(type="filepath", label="Image", height=220)
            with gr.Column():
                labels = gr.Textbox("a cat, a dog, a rocket, a cup of coffee", label="Labels")
                enc_a, enc_b = model_menus(ctx.encoder_choices(), "Model")
                with gr.Row():
                    tmpl_a = gr.Textbox("a photo of {}.", label="Template A")
                    tmpl_b = gr.Textbox("a photo of {}.", label="Template B")
        go = gr.Button("Compare", variant="primary")
        zs_table = gr.Dataframe(headers=RANK_HEADERS, interactive=False,
                                label="Labels and their rank moves")
        zs_summary = gr.Markdown(label="Summary")
        go.click(compare_zero_shot, [image, labels, enc_a, enc_b, tmpl_a, tmpl_b],
                 [zs_table, zs_summary], api_name="compare_zero_shot",
                 **ctx.model_event("short"))
    with gr.Tab("Retrieval A/B"):
        gr.Markdown(f"Searches the {len(DEMO)} demo photos with each model.")
        query = gr.Textbox("a cat", label="Query")
        ret_a, ret_b = model_menus(ctx.encoder_choices(), "Model")
        k = gr.Slider(1, len(DEMO), 5, step=1, label="k")
        go = gr.Button("Compare", variant="primary")
        ret_table = gr.Dataframe(headers=["photo", "rank A", "score A", "rank B", "score B",
                                          "status"], interactive=False, label="Results")
        ret_summary = gr.Markdown(label="Summary")
        go.click(compare_retrieval, [query, ret_a, ret_b, k], [ret_table, ret_summary],
                 api_name="compare_retrieval", **ctx.model_event("short"))
    for menu in (enc_a, enc_b, ret_a, ret_b):
        menu.focus(lambda: gr.update(choices=ctx.encoder_choices()), None, menu,
                   api_visibility="private")
