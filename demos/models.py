"""Models tab: which model plays each role in this kit, its licence and load status."""

import gradio as gr

from mmcore import ROLES

from .context import AppContext, guarded

TITLE = "Models"
# plain words, not emoji: a server without emoji fonts (or a screen reader) shows them right
BADGES = {"ready": "ready", "loading": "loading…", "not loaded": "loads on first use",
          "error": "error (see the Models tab)"}


def header_markdown(ctx: AppContext) -> str:
    rows = ctx.kit.describe()
    parts = [f"**{r['role'].replace('_', ' ')}**: {r['name']} <small>({r['licence']}) · "
             f"{BADGES[r['status']]}</small>" for r in rows]
    return (f"### mmcore · kit `{ctx.kit.name}` · {ctx.kit.device} · precision "
            f"`{ctx.kit.precision}`\n" + " &nbsp;|&nbsp; ".join(parts))


def busy(ctx: AppContext) -> bool:
    """True while anything is loading (or about to, in the background warm-up)."""
    return ctx.warming or any(r["status"] == "loading" for r in ctx.kit.describe())


def table(ctx: AppContext) -> list:
    return [[r["role"], r["name"], r["licence"], r["source"], r["status"], r["error"],
             r["precision"]] for r in ctx.kit.describe()]


def build(ctx: AppContext) -> None:
    @guarded
    def kit_info() -> dict:
        """The kit's name, device and each role's model, licence and status."""
        from mmcore.precision import capability

        return {"kit": ctx.kit.name, "device": str(ctx.kit.device),
                "precision": ctx.kit.precision, "cpu": capability().line(),
                "roles": ctx.kit.describe()}

    @guarded
    def load_all() -> list:
        """Load every role now (models otherwise load on first use)."""
        for role in ROLES:
            ctx.kit.model(role)
        return table(ctx)

    gr.Markdown(
        "Each role is played by one model. Models load on first use, or in the background "
        "when the app starts; the header above shows their status.")
    models = gr.Dataframe(value=table(ctx),
                          headers=["role", "model", "licence", "source", "status", "error",
                                   "precision"],
                          interactive=False, wrap=True, label="Models in this kit",
                          column_widths=["10%", "18%", "8%", "20%", "10%", "18%", "16%"])
    timer = gr.Timer(2.0)

    def refresh_table():
        return table(ctx), gr.Timer(active=busy(ctx))

    timer.tick(refresh_table, outputs=[models, timer], queue=False, show_progress="hidden",
               api_visibility="private")
    ctx.on_page_load(refresh_table, [models, timer])
    with gr.Row():
        load_btn = gr.Button("Load all now", variant="primary")
        refresh_btn = gr.Button("Refresh")
    info = gr.JSON(label="Kit (as the API returns it)", visible=False)
    load_btn.click(load_all, outputs=models, api_name="load_all", **ctx.model_event())
    refresh_btn.click(kit_info, outputs=info, api_name="kit_info").then(
        lambda: table(ctx), outputs=models, api_visibility="private")
