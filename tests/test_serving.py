"""Continuous batching: every stream in the shared batch gets token for token what it would
get alone (greedy and seeded), streams join mid-flight and leave on their own, and the
scheduler leaves no thread behind."""

import math
import threading
import time

import pytest
import torch

import mmcore
from mmcore import generation as G
from mmcore import serving as S
from mmcore.lanes import PRIORITY

PROMPTS = ["the cat sat on the", "a photo of a rocket over the sea at night", "hello",
           "once upon a time in a land far away there lived"]


def parts(kit):
    lm = kit.model("causal_lm")
    return lm.model, lm.tokenizer


def alone(kit, prompt, forced=None, **kw):
    """The batch-1 reference: generation.generate_tokens."""
    model, tok = parts(kit)
    run = G.Generation(G.SamplingParams())
    list(G.generate_tokens(model, tok, prompt, G.SamplingParams(**kw), forced=forced, run=run))
    return run


def together(scheduler, jobs):
    """Run (prompt, kwargs) jobs as concurrent users of one scheduler; their Generations."""
    runs = [G.Generation(G.SamplingParams()) for _ in jobs]
    errors = []

    def user(i, prompt, kw):
        try:
            forced = kw.pop("forced", None)
            list(scheduler.generate_tokens(prompt, G.SamplingParams(**kw), forced=forced,
                                           run=runs[i]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(i, p, dict(kw)))
               for i, (p, kw) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return runs


def same_run(ours, ref):
    assert [t.token_id for t in ours.tokens] == [t.token_id for t in ref.tokens]
    assert ours.text == ref.text and ours.finish == ref.finish
    assert [t.text for t in ours.tokens] == [t.text for t in ref.tokens]
    for a, b in zip(ours.tokens, ref.tokens):
        assert abs(a.prob - b.prob) < 1e-5
        assert [x[2] for x in a.alternatives[:2]] == [x[2] for x in b.alternatives[:2]]


def wait_until(condition, limit=120.0):
    """Poll for a state of the scheduler (never asserts on time, only avoids a hang)."""
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, "the scheduler never got there"
        time.sleep(0.005)


@pytest.fixture
def scheduler(tiny_kit):
    model, tok = parts(tiny_kit)
    sched = S.Scheduler(model, tok, S.ServingConfig(max_batch=8, max_pause=600,
                                                    pause_for_short=True))
    yield sched
    sched.close()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_greedy_equals_batch_one_tiny(tiny_kit, scheduler, penalty):
    jobs = [(p, dict(max_new_tokens=n, repetition_penalty=penalty))
            for p, n in zip(PROMPTS, (40, 25, 33, 40))]
    runs = together(scheduler, jobs)
    for (prompt, kw), run in zip(jobs, runs):
        same_run(run, alone(tiny_kit, prompt, **kw))
    assert scheduler.peak_batch >= 2


def same_until_a_near_tie(ours, ref, near_tie=0.5):
    """`fast` multiplies in bf16: rounding each activation to 8 significant bits turns the
    float noise of another batch shape (the padding mask's attention) into probabilities
    up to ~0.03 apart, so a greedy choice between two tokens whose logits are closer than
    `near_tie` may go either way. Equal tokens up to such a tie; different after one."""
    mine, theirs = [t.token_id for t in ours.tokens], [t.token_id for t in ref.tokens]
    for i, (a, b) in enumerate(zip(mine, theirs)):
        alts = ref.tokens[i].alternatives
        if len(alts) > 1 and math.log(alts[0][1] / alts[1][1]) < near_tie:
            return                                       # a coin toss: the rest may differ
        assert a == b, (i, mine, theirs)
        assert abs(ours.tokens[i].prob - ref.tokens[i].prob) < 0.03
    assert mine == theirs and ours.finish == ref.finish


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_batched_greedy_equals_batch_one_offline(offline_kit, precision):
    """At `fast`, equal up to a near-tie (`same_until_a_near_tie`): its probabilities move a
    little with the batch (measured up to 0.013 with the int8 x int8 head, 0.034 with the
    weight-only one)."""
    import mmcore

    kit = offline_kit if precision == "exact" else mmcore.load_kit("offline", precision="fast")
    model, tok = parts(kit)
    sched = S.Scheduler(model, tok, S.ServingConfig(max_batch=4, pause_for_short=True))
    jobs = [("Write one sentence about the sea.", dict(max_new_tokens=24, chat=True)),
            ("The sea is", dict(max_new_tokens=24, chat=False)),
            ("Count from 1 to 10, one number per line.", dict(max_new_tokens=24)),
            ("Hi", dict(max_new_tokens=24, stop=("!",)))]
    try:
        runs = together(sched, jobs)
    finally:
        sched.close()
    for (prompt, kw), run in zip(jobs, runs):
        if precision == "exact":
            same_run(run, alone(kit, prompt, **kw))
        else:
            same_until_a_near_tie(run, alone(kit, prompt, **kw))


def test_streams_join_mid_flight(tiny_kit, scheduler):
    first = dict(max_new_tokens=60)
    results = {}

    def user(name, prompt, kw):
        run = G.Generation(G.SamplingParams())
        list(scheduler.generate_tokens(prompt, G.SamplingParams(**kw), run=run))
        results[name] = run

    with PRIORITY.short():               # hold the scheduler between two steps
        a = threading.Thread(target=user, args=("a", PROMPTS[0], first))
        a.start()
        wait_until(lambda: scheduler.admitted == 1)      # a admitted, not yet run
        b = threading.Thread(target=user, args=("b", PROMPTS[1], dict(max_new_tokens=20)))
        b.start()
        wait_until(lambda: scheduler.load()["waiting"] == 1)
    # a is prefilled and decodes a step alone; b joins it at the next step
    c = threading.Thread(target=user, args=("c", PROMPTS[3], dict(max_new_tokens=30)))
    c.start()
    for t in (a, b, c):
        t.join()
    assert scheduler.peak_batch >= 2
    same_run(results["a"], alone(tiny_kit, PROMPTS[0], **first))
    same_run(results["b"], alone(tiny_kit, PROMPTS[1], max_new_tokens=20))
    same_run(results["c"], alone(tiny_kit, PROMPTS[3], max_new_tokens=30))


def test_streams_arriving_together_share_one_prefill(tiny_kit, scheduler):
    """Users arriving at once: their prompts (forced tokens included) run in one left-padded
    forward, joining a running stream, and each still gets what it gets alone (greedy,
    seeded, forced); one ending at its first token leaves the others' rows right."""
    model, _ = parts(tiny_kit)
    prompt_forwards = []

    def seen(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            prompt_forwards.append(tuple(ids.shape))

    ref = alone(tiny_kit, "the cat sat", max_new_tokens=8)
    forced = [t.token_id for t in ref.tokens[:2]] + [ref.tokens[2].alternatives[1][2]]
    jobs = {"b": (PROMPTS[1], dict(max_new_tokens=20)),
            "c": ("the cat sat", dict(max_new_tokens=9, forced=forced)),
            "d": (PROMPTS[3], dict(max_new_tokens=25, temperature=0.9, seed=4)),
            "e": (PROMPTS[3] + " and", dict(max_new_tokens=1)),     # the longest: ends at
            "f": ("hi", dict(max_new_tokens=15))}                     # its first token
    results = {}

    def user(name, prompt, kw):
        kw = dict(kw)
        forced = kw.pop("forced", None)
        run = G.Generation(G.SamplingParams())
        list(scheduler.generate_tokens(prompt, G.SamplingParams(**kw), forced=forced, run=run))
        results[name] = run

    hook = model.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        with PRIORITY.short():               # hold the scheduler between two steps
            a = threading.Thread(target=user, args=("a", PROMPTS[0], dict(max_new_tokens=40)))
            a.start()
            wait_until(lambda: scheduler.admitted == 1)
            others = [threading.Thread(target=user, args=(n, p, kw)) for n, (p, kw) in
                      jobs.items()]
            for t in others:
                t.start()
            wait_until(lambda: scheduler.load()["waiting"] == len(jobs))
        for t in [a] + others:
            t.join()
    finally:
        hook.remove()
    # a's prompt alone, then the five others' in one forward, padded to the longest
    tok = parts(tiny_kit)[1]
    chat = G.use_chat(tok, G.SamplingParams().chat)
    widths = [len(G.prompt_ids(tok, p, chat)) + len(kw.get("forced", ())) for p, kw in jobs.values()]
    assert prompt_forwards[1:] == [(len(jobs), max(widths))]
    assert max(widths) == widths[3]         # e's rows left the batch: its padding trimmed
    assert scheduler.peak_batch == 1 + len(jobs) - 1           # e left before joining
    same_run(results["a"], alone(tiny_kit, PROMPTS[0], max_new_tokens=40))
    for name, (prompt, kw) in jobs.items():
        kw = dict(kw)
        same_run(results[name], alone(tiny_kit, prompt, forced=kw.pop("forced", None), **kw))
    assert [t.token_id for t in results["c"].tokens][:3] == forced


def test_one_streams_stop_does_not_touch_the_others(tiny_kit, scheduler):
    mine = threading.Event()
    runs = {}

    def stopper():
        run = G.Generation(G.SamplingParams())
        for info in scheduler.generate_tokens(PROMPTS[0], G.SamplingParams(max_new_tokens=200),
                                              mine, run=run):
            if len(run.tokens) == 3:
                mine.set()
        runs["stopped"] = run

    def closer():                     # a client that goes away: the generator is closed
        gen = scheduler.generate_tokens(PROMPTS[2], G.SamplingParams(max_new_tokens=200))
        next(gen)
        gen.close()

    with PRIORITY.short():          # all four start in the same batch
        threads = [threading.Thread(target=stopper), threading.Thread(target=closer)]
        for t in threads:
            t.start()
        others = {}

        def other(i):
            run = G.Generation(G.SamplingParams())
            list(scheduler.generate_tokens(PROMPTS[i], G.SamplingParams(max_new_tokens=40),
                                           run=run))
            others[i] = run

        threads += [threading.Thread(target=other, args=(i,)) for i in (1, 3)]
        for t in threads[2:]:
            t.start()
        wait_until(lambda: scheduler.admitted + scheduler.load()["waiting"] == 4)
    for t in threads:
        t.join()
    assert len(runs["stopped"].tokens) == 3 and runs["stopped"].finish == "cancelled"
    for i in (1, 3):
        same_run(others[i], alone(tiny_kit, PROMPTS[i], max_new_tokens=40))
    wait_until(lambda: scheduler.load()["active"] == 0)       # the stopped rows left


def test_a_paced_consumer_sleeps_until_its_update_and_still_gets_every_token(tiny_kit,
                                                                               scheduler):
    """With `pace`, the consumer's thread is not woken per token: after its first token it
    sleeps its interval (here far longer than the run), is woken by the stream's end, and
    takes every token then, in order, the same as batch 1; `run.behind` says how many were
    still queued behind each. (Decoding waits until the consumer goes to sleep, so the
    burst does not depend on which thread is quicker.)"""
    asleep, step = threading.Event(), scheduler._step

    def gated_step():
        asleep.wait(60)
        step()

    scheduler._step = gated_step
    calls = []

    def pace():
        calls.append(len(run.tokens))
        asleep.set()
        return 60.0

    run, seen = G.Generation(G.SamplingParams()), []
    start = time.monotonic()
    for info in scheduler.generate_tokens(PROMPTS[0], G.SamplingParams(max_new_tokens=40),
                                          run=run, pace=pace):
        seen.append(run.behind)
    assert time.monotonic() - start < 60          # woken by the end, not by its interval
    same_run(run, alone(tiny_kit, PROMPTS[0], max_new_tokens=40))
    assert calls == [1]                            # one sleep, after the first token
    assert seen == [0] + list(range(38, -1, -1)) and run.behind == 0


def test_stop_wakes_a_paced_consumer_with_the_tokens_decoded_while_it_slept(tiny_kit,
                                                                             scheduler):
    """Stop pressed while the consumer sleeps between updates: the scheduler ends the
    stream at its next step, which wakes the consumer (not its interval), and the consumer
    still gets the five tokens decoded while it slept, then no more."""
    halt, asleep, step, steps = threading.Event(), threading.Event(), scheduler._step, []

    def gated_step():
        asleep.wait(60)
        step()
        steps.append(1)
        if len(steps) == 5:
            halt.set()              # Stop, pressed after five more tokens

    scheduler._step = gated_step
    calls = []

    def pace():
        calls.append(1)
        asleep.set()
        return 60.0

    run, start = G.Generation(G.SamplingParams()), time.monotonic()
    list(scheduler.generate_tokens(PROMPTS[0], G.SamplingParams(max_new_tokens=200), halt,
                                   run=run, pace=pace))
    assert time.monotonic() - start < 60
    assert calls == [1] and run.finish == "cancelled" and len(run.tokens) == 6
    ref = alone(tiny_kit, PROMPTS[0], max_new_tokens=6)
    assert [t.token_id for t in run.tokens] == [t.token_id for t in ref.tokens]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("paced", [False, True])
def test_a_dead_scheduler_thread_fails_its_streams_instead_of_hanging(tiny_kit, scheduler,
                                                                     paced):
    """Something escaping the scheduler's own error handling (here a BaseException from a
    step) kills its thread; its consumers get an error instead of waiting forever."""
    def dying_step():
        raise SystemExit("a bug")

    scheduler._step = dying_step
    run = G.Generation(G.SamplingParams())
    with pytest.raises(RuntimeError, match="scheduler stopped"):
        list(scheduler.generate_tokens(PROMPTS[0], G.SamplingParams(max_new_tokens=20),
                                       run=run, pace=(lambda: 0.05) if paced else None))
    assert len(run.tokens) == 1 and not scheduler.running


def test_one_streams_failure_in_a_step_fails_that_stream_alone(tiny_kit, scheduler,
                                                                monkeypatch):
    """A stream whose own token choice fails mid-batch (its sampling settings) ends with its
    error; the streams decoding beside it go on as if alone. (One user's temperature 1e-37
    had failed every stream in the batch with "not finite".)"""
    real = S._Stream._choose

    def choose(self, row):
        if self.params.seed == 666 and len(self.generated) >= 3:
            raise mmcore.InputError("this stream's own failure")
        return real(self, row)

    monkeypatch.setattr(S._Stream, "_choose", choose)
    runs = [G.Generation(G.SamplingParams()) for _ in PROMPTS]
    results = {}

    def user(i):
        kw = dict(max_new_tokens=30, seed=666 if i == 0 else i)
        try:
            list(scheduler.generate_tokens(PROMPTS[i], G.SamplingParams(**kw), run=runs[i]))
            results[i] = "done"
        except mmcore.InputError as exc:
            results[i] = str(exc)

    with PRIORITY.short():                   # all start in the same batch
        threads = [threading.Thread(target=user, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        wait_until(lambda: scheduler.admitted + scheduler.load()["waiting"] == len(PROMPTS))
    for t in threads:
        t.join()
    assert results[0] == "this stream's own failure" and len(runs[0].tokens) == 3
    for i in range(1, len(PROMPTS)):
        assert results[i] == "done"
        same_run(runs[i], alone(tiny_kit, PROMPTS[i], max_new_tokens=30, seed=i))


def test_a_long_prompt_joining_running_streams_does_not_freeze_them(tiny_kit, scheduler):
    """A long prompt is prefilled in chunks with a decode step of the running streams after
    each (it had run whole, freezing every other stream: 29 s for 8,150 digits on the
    offline kit); its answer is the one it gets alone, and so are theirs."""
    long_prompt = " ".join(["the cat sat on the mat and looked at the dog"] * 33)
    model, tok = parts(tiny_kit)
    assert len(tok(long_prompt)["input_ids"]) > 900           # 7+ chunks of 128
    running = G.Generation(G.SamplingParams())
    seen = {}

    def runner():
        list(scheduler.generate_tokens(PROMPTS[3], G.SamplingParams(max_new_tokens=400),
                                       run=running))

    thread = threading.Thread(target=runner)
    thread.start()
    wait_until(lambda: len(running.tokens) >= 5)
    joining = G.Generation(G.SamplingParams())
    seen["before"] = len(running.tokens)
    for _ in scheduler.generate_tokens(long_prompt, G.SamplingParams(max_new_tokens=20),
                                       run=joining):
        seen.setdefault("first", len(running.tokens))
    thread.join()
    # the running stream went on during the joining prompt's chunks (old: one step at most)
    assert seen["first"] - seen["before"] >= 3, seen
    assert running.finish == "length"
    same_run(joining, alone(tiny_kit, long_prompt, max_new_tokens=20))
    same_run(running, alone(tiny_kit, PROMPTS[3], max_new_tokens=400))


def test_seeded_sampling_is_the_same_whatever_the_batch(tiny_kit, scheduler):
    kw = dict(max_new_tokens=30, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    ref = alone(tiny_kit, "the cat", **kw)
    company = [(p, dict(max_new_tokens=30, temperature=1.2, seed=i, repetition_penalty=1.2))
               for i, p in enumerate(PROMPTS)]
    runs = together(scheduler, [("the cat", kw)] + company)
    same_run(runs[0], ref)
    for (prompt, kw2), run in zip(company, runs[1:]):
        same_run(run, alone(tiny_kit, prompt, **kw2))


def test_forced_tokens_continue_like_model_generate(tiny_kit, scheduler):
    model, tok = parts(tiny_kit)
    ref = alone(tiny_kit, "the cat sat", max_new_tokens=10)
    forced = [t.token_id for t in ref.tokens[:3]] + [ref.tokens[3].alternatives[1][2]]
    run = together(scheduler, [("the cat sat", dict(max_new_tokens=6, forced=forced)),
                               (PROMPTS[1], dict(max_new_tokens=12))])[0]
    got = [t.token_id for t in run.tokens]
    assert got[:4] == forced and [t.forced for t in run.tokens] == [True] * 4 + [False] * 6
    assert abs(run.tokens[3].prob - ref.tokens[3].alternatives[1][1]) < 1e-5
    # the continuation is model.generate's on prompt + forced (the last forced token is
    # in the prefill and is not fed again)
    ids = torch.tensor([G.prompt_ids(tok, "the cat sat", False) + forced])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=6, pad_token_id=tok.eos_token_id)
    assert got[4:] == out[0, ids.shape[1]:].tolist()


def test_closing_the_scheduler_leaves_no_thread(tiny_kit):
    def schedulers():
        return [t for t in threading.enumerate() if t.name == "mmcore-scheduler"]

    before = len(schedulers())
    model, tok = parts(tiny_kit)
    sched = S.Scheduler(model, tok, S.ServingConfig(max_pause=600, pause_for_short=True))
    assert sched.generate("the cat", G.SamplingParams(max_new_tokens=5)) == \
        G.generate(model, tok, "the cat", G.SamplingParams(max_new_tokens=5))
    assert sched.running and len(schedulers()) == before + 1
    with PRIORITY.short():          # a stream still waiting when it closes is cancelled
        run = G.Generation(G.SamplingParams())
        gen = sched.generate_tokens("the cat", G.SamplingParams(max_new_tokens=50), run=run)
        waiting = threading.Thread(target=lambda: list(gen))
        waiting.start()
        wait_until(lambda: sched.admitted == 2)      # admitted, parked before its prefill
        sched.close()
    waiting.join()
    assert run.finish == "cancelled"
    assert not sched.running and len(schedulers()) == before
    with pytest.raises(RuntimeError, match="closed"):
        list(sched.generate_tokens("the cat", G.SamplingParams(max_new_tokens=5)))


def test_kit_serves_through_the_scheduler(tiny_kit):
    plain = tiny_kit.generate("the cat sat", max_new_tokens=20)
    many = tiny_kit.generate("the cat", max_new_tokens=20, temperature=0.9, seed=3,
                             num_candidates=3)
    pieces = list(tiny_kit.stream("the cat sat", max_new_tokens=20))
    tiny_kit.serve(S.ServingConfig(max_batch=4, pause_for_short=True))
    try:
        sched = tiny_kit.scheduler()
        assert sched is not None and tiny_kit.scheduler() is sched
        assert tiny_kit.generate("the cat sat", max_new_tokens=20) == plain
        assert tiny_kit.generate("the cat", max_new_tokens=20, temperature=0.9, seed=3,
                                 num_candidates=3) == many
        assert "".join(tiny_kit.stream("the cat sat", max_new_tokens=20)) == "".join(pieces)
        assert sched.steps > 0 and sched.peak_batch == 3
    finally:
        tiny_kit.stop_serving()
    assert tiny_kit.scheduler() is None and not sched.running


def test_stream_holds_back_what_could_become_a_stop_sequence():
    from mmcore import generation as G

    assert G._held_back("count 1 2 3", ("3 4",)) == len("3")
    assert G._held_back("count 1 2 3", ("9",)) == 0
    assert G._held_back("ab", ("abc", "bx")) == 2
    assert G._held_back("", ("x",)) == 0


def test_bad_requests_fail_in_the_callers_thread(tiny_kit, scheduler):
    import mmcore

    with pytest.raises(mmcore.InputError, match="empty"):
        list(scheduler.generate_tokens("  ", G.SamplingParams()))
    with pytest.raises(mmcore.InputError, match="max_new_tokens"):
        scheduler.generate("the cat", G.SamplingParams(max_new_tokens=0))
    # the scheduler still serves
    assert scheduler.generate("the cat", G.SamplingParams(max_new_tokens=5)) == \
        tiny_kit.generate("the cat", max_new_tokens=5)


def test_short_work_pauses_the_scheduler_between_steps(tiny_kit, scheduler):
    done = threading.Event()

    def user():
        list(scheduler.generate_tokens("the cat", G.SamplingParams(max_new_tokens=200)))
        done.set()

    t = threading.Thread(target=user)
    t.start()
    wait_until(lambda: scheduler.steps > 2)
    with PRIORITY.short():
        wait_until(lambda: PRIORITY.waiting == 1)    # parked between two steps
        held = scheduler.steps
        time.sleep(0.05)
        assert scheduler.steps == held and not done.is_set()
    t.join()
    assert PRIORITY.waiting == 0


def test_token_budget_holds_streams_back_until_they_fit(tiny_kit):
    model, tok = parts(tiny_kit)
    sched = S.Scheduler(model, tok, S.ServingConfig(max_batch=8, token_budget=60,
                                                    pause_for_short=True))
    jobs = [(PROMPTS[0], dict(max_new_tokens=40)), (PROMPTS[1], dict(max_new_tokens=40)),
            (PROMPTS[2], dict(max_new_tokens=1))]     # one token: done at its prefill
    try:
        runs = together(sched, jobs)
    finally:
        sched.close()
    assert sched.peak_batch == 1                       # 2 x ~46 tokens never fit in 60
    for (prompt, kw), run in zip(jobs, runs):
        same_run(run, alone(tiny_kit, prompt, **kw))
    assert len(runs[2].tokens) == 1 and runs[2].finish == "length"


def test_a_consumers_thread_lets_go_of_its_openmp_workers(tiny_kit, scheduler, monkeypatch):
    """A thread that hands the scheduler a stream then only waits for its tokens: OpenMP
    workers it kept from earlier torch work (making the scheduler, a fill-mask call) would
    make the scheduler's workers sleep between their parallel regions (offline kit, one
    stream on 2 cores: a step 20 -> 11 ms, a 12-token prefill 45 -> 25 ms once let go)."""
    calls, real = [], S.release_threads
    monkeypatch.setattr(S, "release_threads",
                        lambda: calls.append(threading.current_thread()) or real())
    consumers = []

    def consumer(many):
        consumers.append(threading.current_thread())
        torch.ones(64, 64) @ torch.ones(64, 64)            # torch work in this thread
        if many:
            scheduler.generate("hello", G.SamplingParams(max_new_tokens=2), num_candidates=2)
        else:
            list(scheduler.generate_tokens("hello", G.SamplingParams(max_new_tokens=2)))

    for many in (False, True):
        t = threading.Thread(target=consumer, args=(many,))
        t.start()
        t.join()
    assert len(consumers) == 2 and all(any(c is x for x in calls) for c in consumers)


def test_the_scheduler_thread_sets_its_own_cpu_threads(tiny_kit):
    """The scheduler's ops run on its configured thread count (on a small CPU, 1: a non-main
    thread's OpenMP team made one user's decode 2x slower at 2 threads), and the setting is
    the scheduler thread's own: the caller's threads are untouched."""
    model, tok = parts(tiny_kit)
    seen = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    sched = S.Scheduler(model, tok, S.ServingConfig(threads=1, max_pause=600,
                                                    pause_for_short=True))
    try:
        want = G.generate(model, tok, "the cat", G.SamplingParams(max_new_tokens=4))
        seen.clear()
        assert sched.generate("the cat", G.SamplingParams(max_new_tokens=4)) == want
    finally:
        sched.close()
        hook.remove()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    assert S.decode_threads("cuda") == 0 and S.decode_threads("cpu") >= 1
