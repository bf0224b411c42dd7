"""An HTTP search back end over a loaded index, for other programs (as clip-retrieval's back
end): `mmcore-index serve DIR`, or `make_app(index)` inside your own ASGI server.

    GET  /                   {"images", "dim", "model"}
    POST /search             {"text"?, "image"? (base64), "negative"?, "k"?}
                             -> {"results": [{"id", "score", "caption", "thumbnail"}]}
    GET  /thumbnail/{n}      the JPEG thumbnail of row n (404 when the index kept none)

Errors are {"error": "plain text"} with status 400 (bad query), 413 (too large) or 404.
A text is always text (never a path); an image comes as bytes, never as a server path.
"""

import base64
import binascii

from .errors import InputError
from .images import MAX_BYTES
from .index import safe_thumbnail

MAX_BODY = MAX_BYTES * 4 // 3 + 64 * 1024      # one base64 image plus the JSON around it
MAX_K = 1000


def make_app(index):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="mmcore index", docs_url="/docs", redoc_url=None)

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    def answer(body) -> dict:
        if not isinstance(body, dict):
            raise InputError("The body must be a JSON object.")
        unknown = set(body) - {"text", "image", "negative", "k"}
        if unknown:
            raise InputError(f"Unknown field(s) {sorted(unknown)}; use text, image, negative, k.")
        text, negative = body.get("text"), body.get("negative")
        for name, value in (("text", text), ("negative", negative)):
            if value is not None and not isinstance(value, str):
                raise InputError(f"{name} must be a string.")
        image = body.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise InputError("image must be base64 text of an image file.")
            try:
                image = base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError):
                raise InputError("image is not valid base64.") from None
        if text is None and image is None:
            raise InputError("Give text or image (base64) to search by.")
        k = body.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise InputError(f"k must be a whole number from 1 to {MAX_K}.")
        hits = index.results(text=text, image=image, negative=negative or None, k=k)
        return {"results": [{"id": h["id"], "score": h["score"], "caption": h["caption"],
                             "thumbnail": f"/thumbnail/{h['position']}"
                             if index.thumbnails[h["position"]] else None} for h in hits]}

    @app.get("/")
    def info():
        return {"images": len(index), "dim": int(index.vectors.shape[-1]),
                "model": index.identity}

    @app.post("/search")
    async def search(request: Request):
        from .http_body import TooLarge, read_limited

        try:
            raw = await read_limited(request, MAX_BODY)
        except TooLarge as exc:
            return error(413, str(exc))
        try:
            import json

            body = json.loads(raw or b"null")
        except ValueError:
            return error(400, "The body is not JSON.")
        try:
            return await run_in_threadpool(answer, body)
        except InputError as exc:
            return error(400, str(exc))

    @app.get("/thumbnail/{n}")
    def thumbnail(n: int):
        jpeg = safe_thumbnail(index.thumbnails[n]) if 0 <= n < len(index) else None
        if jpeg is None:
            return error(404, "No thumbnail for that row.")
        return Response(jpeg, media_type="image/jpeg",
                        headers={"X-Content-Type-Options": "nosniff"})

    return app


def serve(index, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Answer searches until interrupted."""
    import uvicorn

    print(f"serving {len(index)} images on http://{host}:{port} (API docs at /docs)",
          flush=True)
    uvicorn.run(make_app(index), host=host, port=port, log_level="warning")
