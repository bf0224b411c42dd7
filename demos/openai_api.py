"""An OpenAI-compatible API on the app's own server, for programs that already speak it:

    GET  /v1/models                 the causal LM this server runs
    POST /v1/completions            {"prompt", "max_tokens", "temperature", "top_p", "n",
                                     "stop", "seed", "stream", ...}
    POST /v1/chat/completions       {"messages": [{"role", "content"}], ...same...}

Both generate through mmcore's own loop with the same parameter checks as the Generate tab
(max tokens, temperature, top-p, prompt length), and both pass one admission gate: at most
`running` generations at once and `waiting` more in line; past that a request gets HTTP 429
("queue is full") at once rather than a hang. Streaming answers are server-sent events as
OpenAI sends them, ending with `data: [DONE]` (with `stream_options: {"include_usage": true}`
a last chunk carries the token counts; an error after the first chunk comes as a
`data: {"error": ...}` event, then `[DONE]`). A client that disconnects, streaming or not,
while it waits or while it runs, stops its generation within a token and frees its place.
Errors are OpenAI-style JSON (`{"error": {"message", "type"}}`).

Extensions beyond OpenAI's fields: `top_k` and `repetition_penalty`. Fields that mean
nothing here (`logprobs`, `presence_penalty`, `frequency_penalty`, `tools`...) are refused
by name rather than silently ignored.
"""

import collections
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
    """At most `running` requests at once, `waiting` more in line (first come, first served),
    the rest turned away with 429. A request over HTTP waits for its turn in the event loop
    (`enter_async`), holding no thread: waiting requests had each held one of the server's
    40 worker threads, and 40 of them left a running stream no thread to go on with, which
    never freed its slot (the whole server hung for good)."""

    def __init__(self, running: int, waiting: int):
        self.running = max(1, running)
        self.limit = self.running + max(0, waiting)
        self.guard = threading.Lock()
        self.inside = 0                   # running + waiting
        self.busy = 0                     # running
        self.line: collections.deque = collections.deque()     # waiting: _Turn
        self._held = threading.local()    # `with gate:` in plain Python: each thread's turn

    def _join(self, loop=None) -> "_Turn":
        turn = _Turn(self, loop)
        with self.guard:
            if self.inside >= self.limit:
                raise ApiError(429, "The queue is full; try again shortly.", "rate_limit_error")
            self.inside += 1
            if self.busy < self.running:
                self.busy += 1
                turn.event.set()
            else:
                self.line.append(turn)
        return turn

    def enter(self) -> "_Turn":
        """A slot, waiting in this thread for it (plain Python use)."""
        turn = self._join()
        turn.event.wait()
        return turn

    async def enter_async(self) -> "_Turn":
        """A slot, waiting in the event loop for it; a cancelled wait leaves the line."""
        import asyncio

        turn = self._join(asyncio.get_running_loop())
        if not turn.granted:
            try:
                await turn.future
            except BaseException:
                with self.guard:
                    waiting = not turn.granted
                    if waiting:
                        self.line.remove(turn)
                        self.inside -= 1
                if not waiting:
                    turn.release()
                raise
        return turn

    def _release(self) -> None:
        with self.guard:
            self.inside -= 1
            while self.line:
                turn = self.line.popleft()
                try:
                    turn.grant()                # the slot passes on: busy stays
                    return
                except RuntimeError:            # its event loop is gone: it left the line
                    self.inside -= 1
            self.busy -= 1

    def __enter__(self):
        turns = self._held.__dict__.setdefault("turns", [])
        turns.append(self.enter())
        return self

    def __exit__(self, *exc):
        self._held.turns.pop().release()


class _Turn:
    """One request's place: granted once it may run; `release()` (idempotent, also as a
    context manager's exit) frees the slot."""

    def __init__(self, gate: Admission, loop=None):
        self.gate, self.loop, self.released = gate, loop, False
        self.event = threading.Event()                     # set: granted
        self.future = loop.create_future() if loop is not None else None

    @property
    def granted(self) -> bool:
        return self.event.is_set()

    def grant(self) -> None:              # under the gate's guard
        if self.loop is not None:         # raises RuntimeError if that loop is closed
            self.loop.call_soon_threadsafe(
                lambda: self.future.done() or self.future.set_result(None))
        self.event.set()

    def release(self) -> None:
        with self.gate.guard:
            if self.released:
                return
            self.released = True
        self.gate._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


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
           "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,),
           "top_logprobs": (0,)}


def _neutral(name: str, value) -> bool:
    """Whether a refused field's value asks for nothing: null, false, or its listed neutral
    value (a number equal to it, never a boolean). A completion's `logprobs: 0` asks for
    the chosen tokens' log-probabilities, so 0 is not neutral there."""
    if value is None or value is False:
        return True
    if isinstance(value, bool):
        return False
    number = isinstance(value, (int, float))
    return any(value == v and number == isinstance(v, (int, float))
               for v in NOTHING.get(name, ()))


def sampling(body: dict, default_max: int) -> tuple:
    """(SamplingParams, n) from an OpenAI request body, checked like the Generate tab's."""
    unknown = sorted(k for k in body if k in REFUSED and not _neutral(k, body[k]))
    if unknown:
        raise ApiError(400, f"Not supported by this server: {', '.join(unknown)}.")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise ApiError(400, "'stream' must be true or false.")
    options = body.get("stream_options")
    if options is not None:
        if not body.get("stream"):
            raise ApiError(400, "'stream_options' needs 'stream': true.")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or \
                not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "'stream_options' takes only 'include_usage' (true or "
                                "false).")
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
        """The whole answer to a request (plain Python use: waits here for a slot)."""
        return self.answer(self.prepare(body, chat), chat)

    def answer(self, prepared: tuple, chat: bool, slot=None, stop_event=None) -> dict:
        """The whole answer to a prepared request. `slot`: its admission, already granted
        (else it waits for one here); `stop_event` ends it early (a client gone)."""
        prompt, params, n, model = prepared
        choices, prompt_tokens, completion = [], 0, 0
        with slot or self.admission.enter():
            for i in range(n):
                if stop_event is not None and stop_event.is_set():
                    break
                p = generation.SamplingParams(**{**params.__dict__, "seed": params.seed + i})
                run, tokens = self.run(prompt, p, model, stop_event)
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

    def stream(self, prepared: tuple, chat: bool, stop_event: threading.Event, slot=None,
               usage: bool = False):
        """Server-sent event lines for a prepared streaming request (`slot`: its admission,
        already granted, else it waits for one when the first line is asked for; held while
        the generator runs). `usage`: stream_options.include_usage."""
        prompt, params, _, model = prepared
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def event(piece=None, finish=None, first=False, **extra):
            if chat:
                delta = {"role": "assistant", "content": ""} if first else \
                    ({"content": piece} if piece is not None else {})
                choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
            else:
                choices = [{"index": 0, "text": piece or "", "logprobs": None,
                            "finish_reason": finish}]
            return "data: " + json.dumps({"id": ident, "object": kind, "created": created,
                                          "model": model[0],
                                          "choices": [] if extra else choices, **extra}) + "\n\n"

        with slot or self.admission.enter():
            run, tokens = self.run(prompt, params, model, stop_event)
            if chat:
                yield event(first=True)
            for info in tokens:
                if info.text:
                    yield event(info.text)
            yield event(finish=FINISH.get(run.finish, "stop"))
            if usage:       # stream_options.include_usage: one more chunk, no choices
                yield event(usage={"prompt_tokens": run.prompt_tokens,
                                   "completion_tokens": len(run.tokens),
                                   "total_tokens": run.prompt_tokens + len(run.tokens)})
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
    from functools import partial

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

    async def watching(request: Request, stop: threading.Event, work):
        """`await work()` while watching the client: when it goes away, `stop` is set and a
        wait in the event loop is cancelled (a call in a thread then ends within a token).
        (finished, its value)."""
        result = []

        async def watch(scope):
            while not stop.is_set():
                if await request.is_disconnected():
                    stop.set()
                    scope.cancel()
                    return
                await anyio.sleep(0.25)

        failed = []
        async with anyio.create_task_group() as group:
            group.start_soon(watch, group.cancel_scope)
            try:
                result.append(await work())
            except Exception as exc:  # noqa: BLE001 - raised below, outside the group
                failed.append(exc)
            group.cancel_scope.cancel()
        if failed:
            raise failed[0]
        return bool(result), (result[0] if result else None)

    async def handle(request: Request, chat: bool):
        slot = None
        try:
            body = await read(request)
            prepared = await anyio.to_thread.run_sync(api.prepare, body, chat)
            stop = threading.Event()
            admitted, slot = await watching(request, stop, api.admission.enter_async)
            if not admitted:                          # gone while waiting: nothing to send
                return JSONResponse({}, status_code=499)
            if body.get("stream"):
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                lines = api.stream(prepared, chat, stop, slot, usage)

                def cleanup():
                    # No thread is inside `lines` whenever this runs (the awaits below are not
                    # abandoned on cancel), so closing it is safe; `stop` ends the generation
                    # loop within a token, and the slot is freed (also if the generator never
                    # started). Idempotent: it runs at the stream's end and again as the
                    # response's background task.
                    stop.set()
                    lines.close()
                    slot.release()

                # the first line (errors before 200), watched: a client gone while its stream
                # waits in the scheduler's queue or prefills is noticed before any token
                try:
                    started, first = await watching(
                        request, stop, partial(anyio.to_thread.run_sync, next, lines))
                except BaseException:
                    cleanup()
                    raise
                if not started:
                    cleanup()
                    return JSONResponse({}, status_code=499)

                async def events():
                    try:
                        yield first
                        while not await request.is_disconnected():
                            try:
                                line = await anyio.to_thread.run_sync(next, lines, None)
                            except Exception as exc:  # noqa: BLE001 - said in the stream
                                yield "data: " + json.dumps(error_body(exc)[1]) + "\n\n"
                                yield "data: [DONE]\n\n"
                                break
                            if line is None:
                                break
                            yield line
                    finally:
                        cleanup()

                return StreamingResponse(events(), media_type="text/event-stream",
                                         background=BackgroundTask(cleanup))
            done, result = await watching(request, stop, partial(
                anyio.to_thread.run_sync, api.answer, prepared, chat, slot, stop))
            slot.release()
            return JSONResponse(result if done else {}, status_code=200 if done else 499)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an API error body
            if slot is not None:
                slot.release()
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
