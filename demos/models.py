"""Models tab: which model plays each role in this kit, its licence and load status."""

import time

import gradio as gr

from mmcore import ROLES

from .context import AppContext, guarded, text_md

TITLE = "Models"
# plain words, not emoji: a server without emoji fonts (or a screen reader) shows them right
BADGES = {"ready": "ready", "loading": "loading…", "not loaded": "loads on first use",
          "error": "error (see the Models tab)"}


def header_markdown(ctx: AppContext) -> str:
    rows = ctx.kit.describe()
    parts = [f"**{r['role'].replace('_', ' ')}**: {r['name']} <small>({r['licence']}) · "
             f"{BADGES[r['status']]}</small>" for r in rows]
    ready = sum(r["status"] == "ready" for r in rows)
    # one line (a phone showed ~40% header), the roles on demand
    return (f"**mmcore** · kit `{ctx.kit.name}` · {ctx.kit.device} · precision "
            f"`{ctx.kit.precision}`\n<details><summary>{ready} of {len(rows)} models ready"
            "</summary>\n\n" + " &nbsp;|&nbsp; ".join(parts) + "\n</details>")


def busy(ctx: AppContext) -> bool:
    """True while anything is loading (or about to, in the background warm-up)."""
    return ctx.warming or any(r["status"] == "loading" for r in ctx.kit.describe())


def describe(ctx: AppContext) -> list:
    """The kit's roles as the API shows them: a local folder by its name only."""
    from mmcore.dual_encoder import public_name

    return [{**r, "source": public_name(r["source"])} for r in ctx.kit.describe()]


COLUMNS = ["role", "model", "licence", "source", "status", "error", "precision", "memory",
           "dtype", "device", "load time"]


def footprint(ctx: AppContext, role: str) -> list:
    """[memory, dtype, device, load time] of a loaded role's model (blank until it loads;
    asking never loads it)."""
    if ctx.kit.status(role) != "ready":
        return ["", "", "", ""]
    from mmcore.memory import own_bytes, tensors_of

    loaded = ctx.kit.model(role)                    # ready: the one already loaded
    seconds = ctx.kit.load_seconds(role)
    took = "" if seconds is None else f"{seconds:.1f} s"
    tensors = list(tensors_of(loaded))
    if not tensors:
        return ["", "", "", took]
    mb = own_bytes(loaded, set()) / 2**20             # each tensor once
    dtypes = "/".join(sorted({str(t.dtype).replace("torch.", "") for t in tensors
                              if t.is_floating_point()}))
    return [f"{mb:,.1f} MB", dtypes, str(next(iter(tensors)).device), took]


def table(ctx: AppContext) -> list:
    return [[r["role"], r["name"], r["licence"], r["source"], r["status"], r["error"],
             r["precision"]] + footprint(ctx, r["role"]) for r in describe(ctx)]


def memory_md(ctx: AppContext) -> str:
    mem = ctx.memory()
    extra = mem["extra_models"]
    loaded = ", ".join(f"{text_md(m['name'])} ({m['mb']:.0f} MB)" for m in extra["loaded"])
    tuned = ", ".join(f"`{text_md(n)}`" for n in sorted(ctx.checkpoints)) or "none yet"
    return (f"Fine-tuned models on this server (Zero-shot and Retrieval offer them): {tuned}."
            f"\n\nProcess memory: **{mem['rss_mb']:.0f} MB**. Fine-tuned models loaded: "
            f"{len(extra['loaded'])} of at most {extra['limit']}"
            + (f": {loaded}." if loaded else "."))


def build(ctx: AppContext) -> None:
    @guarded
    def kit_info(request: gr.Request = None) -> dict:
        """The kit's name, device, precision, each role's model, licence and status; the
        fine-tuned models, runs that can resume, and memory in use."""
        from mmcore.precision import capability

        return {"kit": ctx.kit.name, "device": str(ctx.kit.device),
                "precision": ctx.kit.precision, "cpu": capability().line(),
                "roles": describe(ctx), "finetuned": sorted(ctx.checkpoints),
                "resumable": ctx.resumable(request), "memory": ctx.memory()}

    @guarded
    def load_all() -> list:
        """Load every role now (models otherwise load on first use)."""
        for role in ROLES:
            ctx.kit.model(role)
        return table(ctx)

    gr.Markdown(
        "Each role is played by one model. Models load on first use, or in the background "
        "when the app starts; the header above shows their status.")
    models = gr.Dataframe(value=table(ctx), headers=COLUMNS, interactive=False, wrap=True,
                          label="Models in this kit (memory: weights and buffers)")
    timer = gr.Timer(2.0)

    memory = gr.Markdown(memory_md(ctx))

    def refresh_table():
        return table(ctx), gr.Timer(active=busy(ctx)), memory_md(ctx)

    timer.tick(refresh_table, outputs=[models, timer, memory], show_progress="hidden",
               api_visibility="private")
    ctx.on_page_load(refresh_table, [models, timer, memory])
    with gr.Row():
        load_btn = gr.Button("Load all now", variant="primary")
        refresh_btn = gr.Button("Refresh")
    info = gr.JSON(label="Kit (as the API returns it)", visible=False)
    load_btn.click(load_all, outputs=models, api_name="load_all", **ctx.model_event("long"))
    def refreshed():
        """Refresh visibly: the table, memory, and when."""
        return table(ctx), memory_md(ctx) + f" Refreshed at {time.strftime('%H:%M:%S')}."

    refresh_btn.click(kit_info, outputs=info, api_name="kit_info").then(
        refreshed, outputs=[models, memory], api_visibility="private")
    from . import model_loading

    model_loading.build(ctx)
