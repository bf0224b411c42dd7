"""The Gradio face of mmcore: one module per tab, each with `build(ctx)`."""

import os

import gradio as gr

from . import attention, compare, fill_mask, generate, models, retrieval, train, zero_shot
from .context import MODEL_GROUP, AppContext

TABS = [generate, fill_mask, zero_shot, retrieval, train, compare, attention, models]   # each module: TITLE and build(ctx)


def harden_cache_cleanup() -> None:
    """Gradio adds any path a client names in a file payload to the files it deletes on
    its `delete_cache` schedule; naming a folder makes that `os.remove` raise, which ends the
    schedule for good (and fails shutdown). Drop folders from those sets before each run."""
    from gradio import route_utils

    original = route_utils.delete_files_created_by_app
    if getattr(original, "mmcore_hardened", False):
        return

    def delete_files_created_by_app(blocks, age):
        for _ in range(3):                      # a folder may arrive while we clean
            for paths in blocks.temp_file_sets:
                for path in list(paths):
                    if os.path.isdir(path):
                        paths.discard(path)
            try:
                return original(blocks, age)
            except IsADirectoryError:
                continue

    delete_files_created_by_app.mmcore_hardened = True
    route_utils.delete_files_created_by_app = delete_files_created_by_app


def build_app(ctx: AppContext) -> gr.Blocks:
    harden_cache_cleanup()
    # Gradio's own copies (uploads, outputs) go after `cache_ttl` seconds; ours go with the
    # request or the session (demos/files.py)
    ttl = max(60, int(ctx.cache_ttl))
    with gr.Blocks(title="mmcore", analytics_enabled=False,
                   delete_cache=(min(600, ttl), ttl)) as demo:
        header = gr.Markdown(models.header_markdown(ctx))
        timer = gr.Timer(2.0)

        def refresh_header():
            return models.header_markdown(ctx), gr.Timer(active=models.busy(ctx))

        timer.tick(refresh_header, outputs=[header, timer],
                   show_progress="hidden", api_visibility="private")
        ctx.on_page_load(refresh_header, [header, timer])
        for tab in TABS:
            with gr.Tab(tab.TITLE):
                tab.build(ctx)
        for fn, outputs in ctx.page_load:
            demo.load(fn, outputs=outputs, show_progress="hidden", api_visibility="private")

        def session_ended(request: gr.Request):
            """The user closed or reloaded the page: their files go now, and their gr.State
            (a gallery) too, not an hour later as Gradio would."""
            ctx.files.end(request)
            holder = getattr(demo, "state_holder", None)
            if holder is not None and request.session_hash:
                holder.delete_state(request.session_hash)
                # Gradio keeps each session's copy of the page config (~0.3 MB) until 10,000
                # sessions have come; a public server sees that many strangers
                with holder.lock:
                    holder.session_data.pop(request.session_hash, None)
                    holder.time_last_used.pop(request.session_hash, None)

        demo.unload(session_ended)
    # Every event goes through the queue: with api_open=False the REST routes
    # (/gradio_api/run/predict with any fn_index) refuse queued events, but they run an event
    # with queue=False directly, for anyone, under any session hash. gr.Examples and a few
    # listeners default to queue=False, so set it here for all.
    for fn in demo.fns.values():
        fn.queue = True
    on_gpu_when_lent(demo)
    # a bounded queue; REST routes may not bypass it
    demo.queue(max_size=ctx.queue_size, api_open=False, default_concurrency_limit=1)
    return demo


# seconds of GPU a ZeroGPU Space lends each model event, by concurrency group (lane)
GPU_SECONDS = {"generate": 120, "short": 30, "long": 180, MODEL_GROUP: 120}


def on_gpu_when_lent(demo: gr.Blocks) -> list:
    """On a ZeroGPU Space every model event runs under `@spaces.GPU(duration=...)`, sized to
    its lane (`mmcore.device.gpu_task`, a no-op without the `spaces` package). Returns the
    names of the wrapped handlers."""
    from mmcore.device import gpu_task

    wrapped = []
    for block_fn in demo.fns.values():
        seconds = GPU_SECONDS.get(block_fn.concurrency_id)
        if seconds and block_fn.fn is not None:
            block_fn.fn = gpu_task(seconds)(block_fn.fn)
            wrapped.append(block_fn.name)
    return wrapped


def launch_kwargs(ctx: AppContext, host: str, port: int, share: bool) -> dict:
    """Hardened launch settings (see HARDENING.md)."""
    from starlette.middleware import Middleware

    from .files import UploadLimit, upload_root

    limit = Middleware(UploadLimit, max_bytes=ctx.session_disk_mb * 2**20,
                       total_bytes=lambda: ctx.files.total_bytes, root=upload_root)
    return dict(server_name=host, server_port=port, share=share, max_file_size=ctx.max_file_size,
                app_kwargs={"middleware": [limit]},
                ssr_mode=False, enable_monitoring=False, show_error=False,
                allowed_paths=[],      # the gallery shows thumbnails, never server files
                footer_links=["api"], mcp_server=False, pwa=False)
