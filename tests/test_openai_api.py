"""The OpenAI-compatible /v1 routes, served next to the app on the tiny kit and driven over
plain HTTP: the same text as mmcore's own generate, streamed or not, OpenAI-style errors,
a bounded queue, and a disconnect that frees its slot."""

import json
import time

import httpx
import pytest

import app as app_module
import mmcore
from demos import launch_kwargs, openai_api

PROMPT = "the cat sat on the"


@pytest.fixture(scope="module")
def server(tiny_kit):
    demo, ctx = app_module.create(app_module.parse_args(["--kit", "tiny"]))
    app, url, _ = demo.launch(prevent_thread_lock=True, quiet=True,
                              **launch_kwargs(ctx, "127.0.0.1", None, False))
    api = openai_api.mount(app, ctx)
    yield ctx, api, url + "v1"
    demo.close()


def post(url, body, timeout=120, **kw):
    return httpx.post(url, content=json.dumps(body), timeout=timeout,
                      headers={"content-type": "application/json"}, **kw)


def test_models_lists_the_causal_lm(server):
    ctx, api, url = server
    data = httpx.get(f"{url}/models", timeout=30).json()["data"]
    assert [m["id"] for m in data] == [ctx.kit.spec("causal_lm").name]


def test_completion_equals_mmcore_generate(server):
    ctx, api, url = server
    out = post(f"{url}/completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert out.status_code == 200, out.text
    body = out.json()
    want = ctx.kit.generate(PROMPT, max_new_tokens=12, chat=False)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == want
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_seeded_candidates_equal_num_candidates(server):
    ctx, api, url = server
    body = post(f"{url}/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.9,
                                       "seed": 5, "n": 2}).json()
    want = ctx.kit.generate(PROMPT, max_new_tokens=8, temperature=0.9, seed=5,
                            num_candidates=2, chat=False)
    assert [c["text"] for c in body["choices"]] == want


def test_streamed_text_equals_the_whole_answer(server):
    ctx, api, url = server
    request = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    whole = post(f"{url}/completions", request).json()["choices"][0]["text"]
    with httpx.stream("POST", f"{url}/completions", json={**request, "stream": True},
                      timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_chat_uses_the_transcript_when_the_model_has_no_template(server):
    ctx, api, url = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a cat"}]
    body = post(f"{url}/chat/completions", {"messages": messages, "max_tokens": 10,
                                            "temperature": 0}).json()
    transcript = "System: Be brief.\nUser: a cat\nAssistant:"
    assert body["choices"][0]["message"] == {
        "role": "assistant", "content": ctx.kit.generate(transcript, max_new_tokens=10,
                                                         chat=False)}
    with httpx.stream("POST", f"{url}/chat/completions",
                      json={"messages": messages, "max_tokens": 10, "temperature": 0,
                            "stream": True}, timeout=120) as response:
        events = [json.loads(x[6:]) for x in response.iter_lines() if x and x != "data: [DONE]"]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_new_tokens must be between"),
    ({"prompt": PROMPT, "temperature": float("nan")}, 400, "must be a finite number, not nan"),
    ({"prompt": PROMPT, "temperature": "hot"}, 400, "must be a number"),
    ({"prompt": PROMPT, "logprobs": 3}, 400, "Not supported by this server: logprobs"),
    ({"prompt": PROMPT, "frobnicate": 1}, 400, "Unknown field"),
    ({"prompt": PROMPT, "model": "gpt-4o"}, 404, "is not served here"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": 7}, 400, "'prompt' must be a string"),
    ({"prompt": "a \ud800 b"}, 400, "surrogate"),
    ({"messages": []}, 400, "Unknown field"),
    ({"prompt": PROMPT, "seed": 2**70}, 400, "'seed' must be an integer from"),
    ({"prompt": PROMPT, "seed": -2**63 - 1}, 400, "'seed' must be an integer from"),
    # asked for, so refused rather than ignored (they had passed)
    ({"prompt": PROMPT, "logprobs": 0}, 400, "Not supported by this server: logprobs"),
    ({"prompt": PROMPT, "stream": 1}, 400, "'stream' must be true or false"),
    ({"prompt": PROMPT, "stream": 0}, 400, "'stream' must be true or false"),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "needs 'stream'"),
    ({"prompt": PROMPT, "stream": True, "stream_options": {"usage": 1}}, 400,
     "takes only 'include_usage'"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, message):
    ctx, api, url = server
    out = post(f"{url}/completions", body)
    assert out.status_code == status, out.text
    error = out.json()["error"]
    assert message in error["message"] and error["type"]
    assert "Traceback" not in out.text


def test_bad_json_and_huge_bodies_are_refused(server):
    ctx, api, url = server
    out = httpx.post(f"{url}/completions", content=b"{not json", timeout=30)
    assert out.status_code == 400 and "not valid JSON" in out.json()["error"]["message"]
    out = httpx.post(f"{url}/completions", content=b"x" * (openai_api.MAX_BODY + 1), timeout=30)
    assert out.status_code == 413
    bad_chat = post(f"{url}/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
    assert bad_chat.status_code == 400 and "role" in bad_chat.json()["error"]["message"]


@pytest.mark.parametrize("neutral", [{"presence_penalty": 0}, {"frequency_penalty": 0.0},
                                     {"top_logprobs": 0}, {"best_of": 1.0}, {"logprobs": None},
                                     {"logprobs": False}])
def test_fields_asking_for_nothing_pass(server, neutral):
    """Clients send some refused fields at their neutral values by default."""
    ctx, api, url = server
    out = post(f"{url}/completions", {"prompt": PROMPT, "max_tokens": 2, **neutral})
    assert out.status_code == 200, out.text


def test_a_client_gone_while_waiting_in_line_leaves_it(server, monkeypatch):
    """A request waiting for its turn whose client goes away leaves the line: it never runs,
    and the line's count goes back to 0."""
    import threading

    ctx, api, url = server
    slowed(api, monkeypatch, 0.05)
    ran = []
    real = api.answer
    monkeypatch.setattr(api, "answer", lambda *a, **k: ran.append(1) or real(*a, **k))
    # greedy: 60 tokens on the tiny model (sampled, 1 seed in 40 met EOS within 10 tokens,
    # and the request behind it got its turn before its client left)
    holder = threading.Thread(target=post, args=(f"{url}/completions",
                                                 {"prompt": PROMPT, "max_tokens": 60,
                                                  "temperature": 0}))
    holder.start()
    deadline = time.monotonic() + 30
    while not ran and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(httpx.TimeoutException):
        post(f"{url}/completions", {"prompt": PROMPT, "max_tokens": 5}, timeout=0.5)
    holder.join()
    deadline = time.monotonic() + 20
    while api.admission.inside and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.admission.inside == 0 and api.admission.busy == 0 and not api.admission.line
    assert len(ran) == 1


def test_the_queue_is_bounded():
    gate = openai_api.Admission(running=1, waiting=0)
    with gate:
        with pytest.raises(openai_api.ApiError) as full:
            gate.__enter__()
        assert full.value.status == 429
    with gate:                       # released: the next one gets in
        pass


def test_a_disconnected_stream_stops_and_frees_its_slot(server):
    ctx, api, url = server
    with httpx.stream("POST", f"{url}/completions",
                      json={"prompt": PROMPT, "max_tokens": 900, "temperature": 0.8,
                            "stream": True}, timeout=120) as response:
        for n, _ in enumerate(response.iter_lines()):
            if n == 3:
                break                 # the client goes away mid-answer
    deadline = time.monotonic() + 30
    while api.admission.inside and time.monotonic() < deadline:
        time.sleep(0.1)
    assert api.admission.inside == 0


def test_api_requests_share_decode_steps_with_the_app(server):
    """Through the kit's scheduler: two API completions at once are decoded in one batch
    (and each still equals what it gives alone)."""
    import threading

    ctx, _, _ = server
    scheduler = ctx.kit.scheduler()
    assert scheduler is not None                       # the app serves with batching on
    api = openai_api.Api(ctx, running=2)
    bodies = [{"prompt": p, "max_tokens": 150, "temperature": 0}
              for p in ("the cat sat on the", "a dog ran in the")]
    alone = [api.complete(b, chat=False)["choices"][0]["text"] for b in bodies]
    scheduler.peak_batch = 0
    together = [None, None]

    def call(i):
        together[i] = api.complete(bodies[i], chat=False)["choices"][0]["text"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert together == alone
    assert scheduler.peak_batch >= 2


def test_a_model_loaded_on_the_models_tab_is_served_by_name(server, tmp_path):
    """/v1/models lists a causal LM loaded at run time; naming it answers with that model
    (equal to its own generate), and an unknown name is a 404 in OpenAI's shape."""
    import mmcore
    from appclient import perturbed_copy

    ctx, _, url = server
    folder = perturbed_copy("gpt2", tmp_path / "my-gpt2")
    ctx.pool.allowed["causal_lm"] = [str(folder)]
    ctx.pool.request("causal_lm", str(folder), wait=True)
    ids = [m["id"] for m in httpx.get(f"{url}/models", timeout=30).json()["data"]]
    name = ids[1]
    assert ids[0] == ctx.kit.spec("causal_lm").name and name.startswith("my-gpt2@")
    out = post(f"{url}/completions", {"model": name, "prompt": PROMPT, "max_tokens": 10,
                                      "temperature": 0}).json()
    want = mmcore.load_kit("tiny", causal_lm=str(folder)).generate(PROMPT, max_new_tokens=10)
    assert out["model"] == name and out["choices"][0]["text"] == want
    assert want != ctx.kit.generate(PROMPT, max_new_tokens=10)
    missing = post(f"{url}/completions", {"model": "gpt-4", "prompt": PROMPT})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def slowed(api, monkeypatch, delay, fail_after=None):
    """The API's generations sleep `delay` s per token (in their worker thread, as a slow
    model would), and raise after `fail_after` tokens if given."""
    real = api.run

    def run(prompt, params, model, stop_event=None):
        generation, tokens = real(prompt, params, model, stop_event)

        def slow():
            for n, info in enumerate(tokens):
                if fail_after is not None and n == fail_after:
                    raise mmcore.InputError("this generation's own failure")
                time.sleep(delay)
                yield info
        return generation, slow()

    monkeypatch.setattr(api, "run", run)


def test_requests_waiting_in_line_hold_no_thread(server, monkeypatch):
    """45 requests waiting behind a running stream (one runs at a time here) must not take
    the server's 40 worker threads: they had, the stream found no thread for its next
    token, never freed its slot, and the whole server hung for good."""
    import threading

    ctx, api, url = server
    slowed(api, monkeypatch, 0.05)
    statuses, lines = [], []

    def waiter():
        try:
            statuses.append(post(f"{url}/completions", {"prompt": PROMPT, "max_tokens": 1},
                                 timeout=90).status_code)
        except httpx.HTTPError as exc:
            statuses.append(repr(exc))

    with httpx.stream("POST", f"{url}/completions", timeout=90,
                      json={"prompt": PROMPT, "max_tokens": 80, "temperature": 0,
                            "stream": True}) as response:
        stream = response.iter_lines()
        lines.append(next(stream))
        threads = [threading.Thread(target=waiter) for _ in range(45)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while api.admission.inside < 46 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api.admission.inside == 46          # all 45 in line behind the stream
        lines += [line for line in stream if line]
    for t in threads:
        t.join(timeout=120)
    assert lines[-1] == "data: [DONE]"
    assert statuses == [200] * 45
    assert post(f"{url}/completions", {"prompt": PROMPT, "max_tokens": 1}).status_code == 200


def test_a_client_that_gives_up_on_a_whole_answer_stops_it(server, monkeypatch):
    """A non-streamed request whose client went away stops within a token and frees its
    place (8 x 1024 tokens had gone on decoding to the end)."""
    ctx, api, url = server
    slowed(api, monkeypatch, 0.02)            # the whole answer: 8 x 1000 x 20 ms > 160 s
    with pytest.raises(httpx.TimeoutException):
        post(f"{url}/completions", {"prompt": PROMPT, "max_tokens": 1000, "n": 8,
                                    "temperature": 0}, timeout=1.5)
    deadline = time.monotonic() + 20
    while api.admission.inside and time.monotonic() < deadline:
        time.sleep(0.1)
    assert api.admission.inside == 0


def test_an_error_mid_stream_is_said_in_the_stream(server, monkeypatch):
    """An error after the first chunk ends the stream with an error event and [DONE] (the
    connection had just been cut); the stream's place is freed."""
    ctx, api, url = server
    slowed(api, monkeypatch, 0.0, fail_after=3)
    with httpx.stream("POST", f"{url}/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 40, "temperature": 0,
                            "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error["message"] == "this generation's own failure"
    assert error["type"] == "invalid_request_error"
    assert len(lines) == 3 + 2
    deadline = time.monotonic() + 10
    while api.admission.inside and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.admission.inside == 0


def test_stream_options_include_usage_adds_the_token_counts(server):
    ctx, api, url = server
    request = {"prompt": PROMPT, "max_tokens": 9, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/completions", timeout=60,
                      json={**request, "stream_options": {"include_usage": True}}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    last = chunks[-1]
    assert last["choices"] == [] and all(c["choices"] for c in chunks[:-1])
    whole = post(f"{url}/completions", {k: v for k, v in request.items() if k != "stream"})
    assert last["usage"] == whole.json()["usage"]
    assert last["usage"]["completion_tokens"] == 9
