"""The Gradio face of mmcore: one module per tab, each with `build(ctx)`."""

import gradio as gr

from . import attention, fill_mask, generate, models, retrieval, train, zero_shot
from .context import AppContext

TABS = [generate, fill_mask, zero_shot, retrieval, train, attention, models]   # each module: TITLE and build(ctx)


def build_app(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="mmcore", analytics_enabled=False) as demo:
        header = gr.Markdown(models.header_markdown(ctx))
        timer = gr.Timer(2.0)

        def refresh_header():
            return models.header_markdown(ctx), gr.Timer(active=models.busy(ctx))

        timer.tick(refresh_header, outputs=[header, timer], queue=False,
                   show_progress="hidden", api_visibility="private")
        ctx.on_page_load(refresh_header, [header, timer])
        for tab in TABS:
            with gr.Tab(tab.TITLE):
                tab.build(ctx)
        for fn, outputs in ctx.page_load:
            demo.load(fn, outputs=outputs, queue=False, show_progress="hidden",
                      api_visibility="private")
    # a bounded queue; REST routes may not bypass it
    demo.queue(max_size=ctx.queue_size, api_open=False, default_concurrency_limit=1)
    return demo


def launch_kwargs(ctx: AppContext, host: str, port: int, share: bool) -> dict:
    """Hardened launch settings (see HARDENING.md)."""
    return dict(server_name=host, server_port=port, share=share, max_file_size=ctx.max_file_size,
                ssr_mode=False, enable_monitoring=False, show_error=False,
                allowed_paths=[ctx.gallery_dir] if ctx.gallery_dir else [],
                footer_links=["api"], mcp_server=False, pwa=False)
