"""mmcore's Gradio app: `python app.py [--kit offline|hub|tiny] [--host] [--port] [--share]`.

Nothing happens at import: flags are parsed, the kit checked and the app built in `main()`.

On a Hugging Face Space (`SPACE_ID` set) the defaults follow the Space: the hub kit unless
`MMCORE_KIT` says otherwise, and the address and port Spaces give in `GRADIO_SERVER_NAME` /
`GRADIO_SERVER_PORT`. Flags given on the command line always win.
"""

import argparse
import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile

KITS = ("offline", "hub", "tiny")


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def default_kit() -> str:
    return os.environ.get("MMCORE_KIT") or ("hub" if on_space() else "offline")


def default_host() -> str:
    return os.environ.get("GRADIO_SERVER_NAME") or os.environ.get("MMCORE_HOST") or "127.0.0.1"


def default_port() -> int:
    raw = os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or "7860"
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"mmcore: the port must be a number, not {raw!r}.") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mmcore: use and look inside multimodal models.")
    p.add_argument("--kit", choices=KITS, default=default_kit(),
                   help="model kit (default: $MMCORE_KIT, else hub on a Space, else offline)")
    p.add_argument("--precision", choices=("auto", "exact", "fast"),
                   default=os.environ.get("MMCORE_PRECISION", "auto"),
                   help="exact: fp32, as transformers; fast: bf16/int8/4-bit weights where this "
                        "CPU accelerates them; auto (default): fast where it helps")
    p.add_argument("--host", default=default_host(),
                   help="address to bind (default: $GRADIO_SERVER_NAME, else 127.0.0.1; "
                        "0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=default_port(),
                   help="port (default: $GRADIO_SERVER_PORT, else $PORT, else 7860)")
    p.add_argument("--share", action="store_true", help="make a public gradio.live link")
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="load models on first use only, not in the background at start")
    p.add_argument("--queue-size", type=int, default=64, help="waiting requests before 'queue full'")
    p.add_argument("--batching", choices=("on", "off"), default="on",
                   help="on: generation streams share decode steps and short requests have "
                        "their own lane; off: every model event takes turns in one slot")
    p.add_argument("--max-batch", type=int, default=0,
                   help="streams decoded together (default: 16 on a CPU, 32 on a GPU)")
    p.add_argument("--gallery-dir", default=None,
                   help="a server folder of images the retrieval tab may index (off by default)")
    p.add_argument("--no-openai-api", dest="openai_api", action="store_false",
                   help="do not serve the OpenAI-compatible /v1 routes next to the app")
    p.add_argument("--data-dir", default=None,
                   help="where fine-tuned models and training runs are kept across restarts "
                        "(default: $MMCORE_DATA_DIR, /data/mmcore on a Space with persistent "
                        "storage, else $MMCORE_CACHE/data)")
    p.add_argument("--max-extra-kits", type=int, default=2,
                   help="fine-tuned models kept loaded at once (least recently used goes)")
    p.add_argument("--models", default=None, metavar="FILE",
                   help='JSON of models users may load into a role on the Models tab, e.g. '
                        '{"causal_lm": ["distilgpt2"], "dual_encoder": ["./my-clip"]}')
    p.add_argument("--allow-model-loading", action="store_true",
                   help="let users load any hub id into a role (off by default; server "
                        "folders still need --models)")
    p.add_argument("--extra-model-mb", type=int, default=4096,
                   help="memory for models loaded at run time (least recently used goes)")
    p.add_argument("--session-disk-mb", type=int, default=512,
                   help="temp disk space per user session (uploads unpacked, downloads)")
    p.add_argument("--temp-disk-mb", type=int, default=8192,
                   help="temp disk space of all sessions together, uploads included")
    p.add_argument("--data-disk-mb", type=int, default=10240,
                   help="disk space for fine-tuned models and training runs (kept across "
                        "restarts; past it new runs are refused; 0: no limit)")
    p.add_argument("--cache-ttl", type=int, default=3600,
                   help="seconds Gradio keeps uploaded files and outputs before deleting them")
    p.add_argument("--admin-token", default=os.environ.get("MMCORE_ADMIN_TOKEN", ""),
                   help="a secret that lets the operator stop anyone's training job: call "
                        "/stop_training with the header X-Mmcore-Admin: TOKEN (default: "
                        "$MMCORE_ADMIN_TOKEN; off when empty)")
    return p.parse_args(argv)


def space_storage(root: str = "/data"):
    """The Space's persistent storage folder when it has one (mounted and writable), else None."""
    if on_space() and os.path.isdir(root) and os.access(root, os.W_OK):
        return root
    return None


def configure_environment() -> None:
    """Process-level settings that must be in place before gradio is imported."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    storage = space_storage()
    if storage:
        # a restart keeps downloaded models, converted caches, fine-tuned models and indexes
        os.environ.setdefault("HF_HOME", os.path.join(storage, ".huggingface"))
        os.environ.setdefault("MMCORE_CACHE", os.path.join(storage, "mmcore-cache"))
    # uploads go to a folder of the app's own, not a shared system temp folder; one the app
    # made goes when it exits
    if not os.environ.get("GRADIO_TEMP_DIR"):
        os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="mmcore-gradio-")
        atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def check_kit(args: argparse.Namespace):
    """The kit, checked fast (packages present, hub reachable or cached). Raises MmcoreError."""
    import mmcore

    kit = mmcore.load_kit(args.kit, precision=getattr(args, "precision", None))
    kit.preflight()
    return kit


def allowed_models(args: argparse.Namespace) -> dict:
    """The operator's --models list, checked (InputError names what is wrong)."""
    if not getattr(args, "models", None):
        return {}
    from mmcore.model_pool import read_allowed

    return read_allowed(args.models)


def create(args: argparse.Namespace, kit=None):
    """Build the app for `args` (and an already checked kit); returns (demo, ctx)."""
    from demos import build_app
    from demos.context import AppContext

    kit = kit or check_kit(args)
    ctx = AppContext(kit=kit, queue_size=args.queue_size, gallery_dir=args.gallery_dir,
                     data_dir=args.data_dir, max_extra_kits=args.max_extra_kits,
                     session_disk_mb=args.session_disk_mb, cache_ttl=args.cache_ttl,
                     total_disk_mb=args.temp_disk_mb, data_disk_mb=args.data_disk_mb,
                     admin_token=args.admin_token, allowed_models=allowed_models(args),
                     allow_model_loading=getattr(args, "allow_model_loading", False),
                     extra_model_mb=getattr(args, "extra_model_mb", 4096))
    from mmcore.device import on_zero_gpu

    # ZeroGPU lends a GPU to a request's own handler only, never to a background scheduler
    if getattr(args, "batching", "off") == "on" and not on_zero_gpu():
        from mmcore import lanes, serving

        max_batch = args.max_batch or lanes.default_max_batch(kit.device)
        kit.serve(serving.ServingConfig(max_batch=max_batch))
        ctx.lanes = lanes.lane_sizes(kit.device, max_batch)
    else:
        kit.stop_serving()
    return build_app(ctx), ctx


def main(argv=None) -> int:
    args = parse_args(argv)
    # A host stops the app with SIGTERM (docker stop, a Space restart, systemd): handled as
    # Ctrl-C is, from the start (a first start converts models for minutes), so the server
    # closes and exit handlers remove the app's temp folders
    signal.signal(signal.SIGTERM, _interrupt)
    configure_environment()
    import mmcore

    try:
        kit = check_kit(args)  # before importing gradio: a bad kit fails in seconds
        allowed_models(args)   # and a bad --models file
    except mmcore.MmcoreError as exc:
        print(f"mmcore: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmcore: stopped while starting", file=sys.stderr)
        return 130
    from demos import launch_kwargs

    demo, ctx = create(args, kit)
    from mmcore.lanes import release_threads

    release_threads()    # the main thread's OpenMP workers: model work runs in other threads
    ctx.start_housekeeping()
    if args.warm:
        ctx.start_warming()
    server, _, _ = demo.launch(prevent_thread_lock=True,
                               **launch_kwargs(ctx, args.host, args.port, args.share))
    if args.openai_api:
        from demos import openai_api

        # as many API generations at once as the generate lane runs (they share decode
        # steps in the scheduler); one at a time without batching
        openai_api.mount(server, ctx, running=ctx.lanes.get("generate", 1))
    demo.block_thread()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
