"""An OpenAI-compatible API on the app's own server, for programs that already speak it:

    GET  /v1/models                 the causal LM this server runs
    POST /v1/completions            {"prompt", "max_tokens", "temperature", "top_p", "n",
                                     "stop", "seed", "stream", ...}
    POST /v1/chat/completions       {"messages": [{"role", "content"}], ...same...}

Both generate through mmcore's own loop with the same parameter checks as the Generate tab
(max tokens, temperature, top-p, prompt length), and both pass one admission gate: at most
`running` generations at once and `waiting` more in line; past that a request gets HTTP 429
("queue is full") at once rather than a hang. Streaming answers are server-sent events as
OpenAI sends them, ending with `data: [DONE]`; a client that disconnects stops its
generation within a token. Errors are OpenAI-style JSON (`{"error": {"message", "type"}}`).

Extensions beyond OpenAI's fields: `top_k` and `repetition_penalty`. Fields that mean
nothing here (`logprobs`, `presence_penalty`, `frequency_penalty`, `tools`...) are refused
by name rather than silently ignored.
"""

import json
import logging
import threading
import time
import uuid

from mmcore import InputError, MmcoreError, generation

log = logging.getLogger("mmcore.api")

MAX_BODY = 256 * 1024                     # bytes of JSON per request
MAX_MESSAGES = 64
COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
          "seed", "stream", "user", "top_k", "repetition_penalty", "stream_options"}
REFUSED = {"logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
           "tools", "tool_choice", "functions", "function_call", "response_format", "suffix",
           "echo", "best_of"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Admission:
    """At most `running` requests at once, `waiting` more in line, the rest turned away."""

    def __init__(self, running: int, waiting: int):
        self.slots = threading.BoundedSemaphore(max(1, running))
        self.guard = threading.Lock()
        self.inside, self.limit = 0, max(1, running) + max(0, waiting)

    def __enter__(self):
        with self.guard:
            if self.inside >= self.limit:
                raise ApiError(429, "The queue is full; try again shortly.", "rate_limit_error")
            self.inside += 1
        self.slots.acquire()
        return self

    def __exit__(self, *exc):
        self.slots.release()
        with self.guard:
            self.inside -= 1


def _number(body: dict, name: str, cast, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, not {json.dumps(value)[:40]}.")
    if value != value or value in (float("inf"), float("-inf")):     # json takes NaN, 1e999
        raise ApiError(400, f"'{name}' must be a finite number, not {value}.")
    if cast is int and value != int(value):
        raise ApiError(400, f"'{name}' must be a whole number, not {value}.")
    return cast(value)


# values of refused fields that ask for nothing (clients send them by default)
NOTHING = {"best_of": (1,), "logit_bias": ({},), "tools": ([],), "functions": ([],),
           "suffix": ("",)}


def sampling(body: dict, default_max: int) -> tuple:
    """(SamplingParams, n) from an OpenAI request body, checked like the Generate tab's."""
    unknown = sorted(k for k in body if k in REFUSED and body[k] not in (None, False, 0)
                     and body[k] not in NOTHING.get(k, ()))
    if unknown:
        raise ApiError(400, f"Not supported by this server: {', '.join(unknown)}.")
    if body.get("stream") not in (None, True, False):
        raise ApiError(400, "'stream' must be true or false.")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or
                                 (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ApiError(400, "'stop' must be a string or a list of strings.")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not -2**63 <= seed < 2**63):
        raise ApiError(400, "'seed' must be an integer from -2**63 to 2**63 - 1 (the "
                            "Generate tab's range).")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = generation.SamplingParams(
        max_new_tokens=_number({"max_tokens": max_tokens}, "max_tokens", int, default_max),
        temperature=_number(body, "temperature", float, 1.0),
        top_k=_number(body, "top_k", int, 0), top_p=_number(body, "top_p", float, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", float, 1.0), seed=seed,
        stop=tuple([stop] if isinstance(stop, str) else stop or ()), chat=False)
    n = _number(body, "n", int, 1)
    if not 1 <= n <= generation.MAX_CANDIDATES:
        raise ApiError(400, f"'n' must be between 1 and {generation.MAX_CANDIDATES}.")
    if n > 1 and body.get("stream"):
        raise ApiError(400, "Streaming supports n = 1 only.")
    try:
        params.check()
    except InputError as exc:
        raise ApiError(400, str(exc)) from None
    return params, n


def chat_prompt(tok, messages) -> str:
    """The conversation as the model's own chat template renders it (mmcore.chat)."""
    from mmcore import chat

    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"At most {MAX_MESSAGES} messages.")
    try:
        return chat.render(tok, messages)
    except InputError as exc:
        raise ApiError(400, str(exc)) from None


FINISH = {"eos": "stop", "stop": "stop", "cancelled": "stop", "length": "length"}


class Api:
    """The routes' logic, kept free of FastAPI so it reads (and tests) as plain Python."""

    def __init__(self, ctx, running: int = 1):
        self.ctx = ctx
        self.admission = Admission(running, ctx.queue_size)

    def model_id(self) -> str:
        return self.ctx.kit.spec("causal_lm").name

    def served(self) -> dict:
        """{model id: its kit}: the kit's causal LM, then any loaded on the Models tab."""
        out = {self.model_id(): self.ctx.kit}
        for choice in self.ctx.loaded_choices("causal_lm"):
            out.setdefault(choice[len("loaded: "):], choice)
        return out

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "mmcore"} for name in self.served()]}

    def _kit(self, body: dict) -> tuple:
        """(model id, kit) that the request names (the kit's own model when it names none)."""
        asked = body.get("model")
        if asked in (None, ""):
            return self.model_id(), self.ctx.kit
        served = self.served()
        if not isinstance(asked, str) or asked not in served:
            raise ApiError(404, f"Model {str(asked)[:80]!r} is not served here; GET /v1/models "
                                "lists the models.", "not_found_error")
        kit = served[asked]
        if isinstance(kit, str):                        # loaded at run time
            try:
                kit = self.ctx.role_kit("causal_lm", kit)
            except InputError as exc:
                raise ApiError(404, str(exc), "not_found_error") from None
        return asked, kit

    def prepare(self, body: dict, chat: bool) -> tuple:
        """(prompt text, params, n, the causal LM) for a request body."""
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        allowed = COMMON | REFUSED | ({"messages"} if chat else {"prompt"})
        extra = sorted(set(body) - allowed)
        if extra:
            raise ApiError(400, f"Unknown field(s): {', '.join(extra)[:200]}.")
        name, kit = self._kit(body)
        params, n = sampling(body, 64 if chat else 16)
        if chat:
            prompt = chat_prompt(kit.model("causal_lm").tokenizer, body.get("messages"))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "'prompt' must be a string.")
        return prompt, params, n, (name, kit)

    def run(self, prompt, params, model, stop_event=None):
        """A Generation, filled in as the tokens come (a generator of TokenInfo); through the
        kit, so the app's scheduler decodes API streams together with the UI's."""
        run = generation.Generation(params)
        return run, model[1].generate_tokens(prompt, params, stop_event, run=run)

    def complete(self, body: dict, chat: bool) -> dict:
        prompt, params, n, model = self.prepare(body, chat)
        choices, prompt_tokens, completion = [], 0, 0
        with self.admission:
            for i in range(n):
                p = generation.SamplingParams(**{**params.__dict__, "seed": params.seed + i})
                run, tokens = self.run(prompt, p, model)
                for _ in tokens:
                    pass
                prompt_tokens, completion = run.prompt_tokens, completion + len(run.tokens)
                finish = FINISH.get(run.finish, "stop")
                choices.append({"index": i, "finish_reason": finish, "logprobs": None,
                                **({"message": {"role": "assistant", "content": run.text}}
                                   if chat else {"text": run.text})})
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model[0], "choices": choices,
                "system_fingerprint": f"seed-{params.seed}",
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    def chunks(self, body: dict, chat: bool, stop_event: threading.Event):
        """Server-sent event lines for a streaming request (the admission is held while the
        generator runs)."""
        prompt, params, _, model = self.prepare(body, chat)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def event(piece=None, finish=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if first else \
                    ({"content": piece} if piece is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None,
                          "finish_reason": finish}
            return "data: " + json.dumps({"id": ident, "object": kind, "created": created,
                                          "model": model[0], "choices": [choice]}) + "\n\n"

        with self.admission:
            run, tokens = self.run(prompt, params, model, stop_event)
            if chat:
                yield event(first=True)
            for info in tokens:
                if info.text:
                    yield event(info.text)
            yield event(finish=FINISH.get(run.finish, "stop"))
        yield "data: [DONE]\n\n"


def error_body(exc: Exception) -> tuple:
    """(HTTP status, OpenAI-style error body) for any exception; never a stack trace."""
    if isinstance(exc, ApiError):
        return exc.status, {"error": {"message": exc.message, "type": exc.kind, "param": None,
                                      "code": None}}
    if isinstance(exc, InputError):
        return 400, {"error": {"message": str(exc), "type": "invalid_request_error",
                               "param": None, "code": None}}
    if isinstance(exc, MmcoreError):
        return 503, {"error": {"message": str(exc), "type": "server_error", "param": None,
                               "code": None}}
    log.exception("unexpected error in the OpenAI-compatible API")
    return 500, {"error": {"message": f"Internal error ({type(exc).__name__}); it has been "
                                      "logged on the server.", "type": "server_error",
                           "param": None, "code": None}}


def mount(app, ctx, running: int = 1) -> Api:
    """Add the /v1 routes to the FastAPI app Gradio serves (the one `launch` returns)."""
    import anyio
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask

    api = Api(ctx, running)
    router = APIRouter(prefix="/v1")

    async def read(request: Request) -> dict:
        from mmcore.http_body import TooLarge, read_limited

        try:
            raw = await read_limited(request, MAX_BODY)
        except TooLarge as exc:
            raise ApiError(413, str(exc)) from None
        try:
            return json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON.") from None

    async def handle(request: Request, chat: bool):
        try:
            body = await read(request)
            if isinstance(body, dict) and body.get("stream"):
                stop = threading.Event()
                lines = api.chunks(body, chat, stop)
                first = await anyio.to_thread.run_sync(next, lines)   # errors before 200

                async def events():
                    yield first
                    while not await request.is_disconnected():
                        line = await anyio.to_thread.run_sync(next, lines, None)
                        if line is None:
                            break
                        yield line

                def cleanup():
                    # Runs after the response ends, a client's disconnect included (Starlette
                    # cancels the stream, then runs the background task). No thread is inside
                    # `lines` by then (the awaits above are not abandoned on cancel), so
                    # closing it is safe; it frees the admission slot, and `stop` ends the
                    # generation loop within a token.
                    stop.set()
                    lines.close()
                return StreamingResponse(events(), media_type="text/event-stream",
                                         background=BackgroundTask(cleanup))
            result = await anyio.to_thread.run_sync(api.complete, body, chat)
            return JSONResponse(result)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an API error body
            status, payload = error_body(exc)
            return JSONResponse(payload, status_code=status)

    @router.get("/models")
    def models():
        return api.models()

    @router.post("/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    app.include_router(router)
    return api
