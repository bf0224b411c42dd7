"""Models tab, second part: load a model into a role at run time (a hub id, or a folder the
operator listed), in the background, then pick it in that role's tabs; `/models` lists
every model a user can pick.

What may load is the operator's choice (`--models FILE`, `--allow-model-loading`); see
mmcore/model_pool.py for the policy, the honest checks and the memory budget.
"""

import re
import shutil
import uuid

import gradio as gr

from mmcore import ROLES, InputError
from mmcore.dual_encoder import public_name
from mmcore.text import clean_text

from .context import AppContext, guarded, text_md
from .files import uploaded

MAX_MODEL_BYTES = 2 * 2**30          # unpacked size of an uploaded fine-tuned model

ROLE_LABELS = {"causal_lm": "Generate (causal LM)", "masked_lm": "Fill mask (masked LM)",
               "next_sentence": "Next sentence", "dual_encoder": "Zero-shot and Retrieval "
               "(dual encoder)"}


def policy_md(ctx: AppContext) -> str:
    listed = sum(len(v) for v in ctx.allowed_models.values())
    if ctx.allow_model_loading:
        return ("Any hub id can be loaded here (the operator allowed it)"
                + (f"; {listed} folder(s) or id(s) are listed." if listed else "."))
    if listed:
        return f"The operator listed {listed} model(s) that can be loaded here."
    return ("Loading models is off on this server. Run the app with `--allow-model-loading` "
            "(any hub id) or `--models FILE` (a list) to turn it on.")


def listed_source(ctx: AppContext, name: str) -> str:
    """The operator-listed folder or id shown as `name`, else `name` itself."""
    return {public_name(s): s for v in ctx.allowed_models.values() for s in v}.get(name, name)


def catalogue(ctx: AppContext) -> list:
    """Every model a user can pick, per role: the kit's, fine-tuned ones, loaded and listed."""
    rows = [{"role": r["role"], "model": r["name"], "kind": "kit", "status": r["status"]}
            for r in ctx.kit.describe()]
    rows += [{"role": "dual_encoder", "model": name, "kind": "fine-tuned",
              "status": "available"} for name in sorted(ctx.checkpoints)]
    pool = ctx.pool
    for role in ROLES:
        for source in pool.choices(role):
            rows.append({"role": role, "model": public_name(source), "kind": "run-time",
                         "status": pool.status(role, source)})
    return rows


def table(ctx: AppContext) -> list:
    return [[r["role"], r["model"], r["kind"], r["status"]] for r in catalogue(ctx)]


def build(ctx: AppContext) -> None:
    @guarded
    def load_model(role: str, source: str) -> str:
        """Start loading a model into a role (returns at once; see /models for its status).
        role: causal_lm, masked_lm, next_sentence or dual_encoder; source: a hub id, or a
        folder the operator listed."""
        role, source = (clean_text(v, what, 1000) for v, what in
                        ((role, "Role"), (source, "Model name")))
        name = ctx.pool.request(role, listed_source(ctx, source))
        return (f"{text_md(public_name(name))} for {role}: {ctx.pool.status(role, name)}. "
                "Once ready, pick it as \"loaded: ...\" in that role's tabs.")

    @guarded
    def model_status(role: str, source: str) -> str:
        """The status of a model you asked to load: "loading", "ready", "not loaded" or
        "error: why" (a failed load's reason)."""
        role, source = (clean_text(v, what, 1000, allow_empty=True).strip() for v, what in
                        ((role, "Role"), (source, "Model name")))
        return ctx.pool.status(role, listed_source(ctx, source))

    @guarded
    def load_finetuned_zip(file=None) -> str:
        """Load a fine-tuned model downloaded from the Fine-tune tab (its .zip) as a dual
        encoder; it is then picked as "loaded: NAME" in Zero-shot and Retrieval. Allowed
        where the operator allows model loading (it is kept on the server's disk)."""
        from mmcore import archives
        from mmcore.dual_encoder import load_encoder

        upload = uploaded(file, "fine-tuned model (.zip)")
        if upload is None:
            raise InputError("Upload the .zip the Fine-tune tab gave you.")
        if not ctx.allow_model_loading:
            raise InputError("Loading models is off on this server; the operator can allow "
                             "it with --allow-model-loading.")
        stem = re.sub(r"[^A-Za-z0-9._-]", "-", upload.name.rsplit(".", 1)[0])[:40] or "model"
        folder = ctx.data.root / "uploaded-models" / f"{stem}-{uuid.uuid4().hex[:6]}"
        try:
            archives.safe_extract(upload.path, (".json", ".safetensors", ".txt"), folder,
                                  budget=min(MAX_MODEL_BYTES, ctx.data_left()))
            load_encoder(folder, base=ctx.kit.encoder())       # checked before it is listed
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        ctx.pool.allowed.setdefault("dual_encoder", []).append(str(folder))
        name = ctx.pool.request("dual_encoder", str(folder))
        return (f"{text_md(public_name(name))}: {ctx.pool.status('dual_encoder', name)}. "
                "Once ready, pick it as \"loaded: ...\" in Zero-shot and Retrieval.")

    @guarded
    def models() -> list:
        """Every model a user can pick: [{role, model, kind, status}] (kind: kit,
        fine-tuned, run-time)."""
        return catalogue(ctx)

    gr.Markdown("### Load a model into a role\n" + policy_md(ctx))
    with gr.Row():
        role = gr.Dropdown(choices=[(ROLE_LABELS[r], r) for r in ROLES], value="causal_lm",
                           label="Role", scale=1)
        listed = sorted({public_name(s) for v in ctx.allowed_models.values() for s in v})
        source = gr.Dropdown(choices=listed, value=None, allow_custom_value=True,
                             label="Hub id or listed folder", scale=2,
                             interactive=bool(listed) or ctx.allow_model_loading)
        load = gr.Button("Load", scale=0, interactive=bool(listed) or ctx.allow_model_loading)
    status = gr.Markdown(label="Load status")
    asked = gr.State(None)                         # this user's last (role, source)
    catalogue_table = gr.Dataframe(value=table(ctx), headers=["role", "model", "kind", "status"],
                                   interactive=False, label="Models you can pick")
    timer = gr.Timer(1.0, active=False)
    api = gr.JSON(visible=False, label="Models")

    def refresh(mine):
        """The table, and this user's own load: its status (an error says why) until done."""
        line = gr.update()
        busy = any(r["status"] == "loading" for r in catalogue(ctx))
        if mine:
            state = ctx.pool.status(mine[0], mine[1])
            busy = busy or state == "loading"
            line = f"{text_md(mine[2])} for {mine[0]}: {text_md(state)}."
        return table(ctx), gr.Timer(active=busy), line

    def remember(role_name, name):
        name = str(name or "").strip()
        return (role_name, listed_source(ctx, name), name)

    load.click(load_model, [role, source], status, api_name="load_model").then(
        remember, [role, source], asked, api_visibility="private").then(
        refresh, asked, [catalogue_table, timer, status], api_visibility="private")
    timer.tick(refresh, asked, [catalogue_table, timer, status], show_progress="hidden",
               api_visibility="private")
    gr.Button("Status of my model", size="sm", visible=False).click(
        model_status, [role, source], status, api_name="model_status")
    with gr.Row():
        tuned_zip = gr.File(label="Load a fine-tuned model (.zip from the Fine-tune tab)",
                            file_types=[".zip"], interactive=ctx.allow_model_loading)
        load_zip = gr.Button("Load the fine-tuned model", scale=0,
                             interactive=ctx.allow_model_loading)
    load_zip.click(load_finetuned_zip, tuned_zip, status, api_name="load_finetuned_zip",
                   preprocess=False).then(
        lambda: (table(ctx), gr.Timer(active=True)), None, [catalogue_table, timer],
        api_visibility="private")
    gr.Button("List models", size="sm").click(models, outputs=api, api_name="models")
