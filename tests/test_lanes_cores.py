"""Short work and a CPU scheduler that leaves cores free run side by side: decoding does not
pause for short work, and short work runs on the cores the scheduler leaves."""

import threading
import time

import torch

from mmcore import generation as G
from mmcore import serving as S
from mmcore.lanes import PRIORITY, cpu_cores, default_threads


def test_short_work_takes_the_spare_cores_only_while_the_scheduler_decodes():
    before = torch.get_num_threads()
    PRIORITY.reserve(1)
    try:
        seen = []

        def short():
            torch.set_num_threads(max(2, cpu_cores()))
            with PRIORITY.short():
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())

        t = threading.Thread(target=short)
        t.start()
        t.join()
        # the spare core while it runs; after, the process default (not the count the
        # pooled thread happened to have)
        assert seen[0] == max(1, cpu_cores() - 1) and seen[1] == default_threads()
    finally:
        PRIORITY.reserve(-1)
    with PRIORITY.short():               # nothing reserved: the process default
        assert torch.get_num_threads() == default_threads()
    torch.set_num_threads(before)


def test_a_scheduler_with_free_cores_decodes_through_short_work(tiny_kit):
    """With its one thread on a machine of more cores, the scheduler does not pause while
    short work runs (and reserves its thread only while streams run); with
    pause_for_short=True it waits between steps as before."""
    lm = tiny_kit.model("causal_lm")
    params = G.SamplingParams(max_new_tokens=200, chat=False)
    for pause in (None, True):
        sched = S.Scheduler(lm.model, lm.tokenizer,
                            S.ServingConfig(threads=1, pause_for_short=pause, max_pause=600))
        try:
            pauses = sched.pauses_for_short()
            assert pauses == (pause is True or cpu_cores() <= 1)
            run, reserved = G.Generation(params), []
            with PRIORITY.short():
                t = threading.Thread(target=lambda: list(sched.generate_tokens(
                    "Once upon a time", params, run=run)))
                t.start()
                deadline = time.monotonic() + 120        # a wrong pause fails, not hangs
                while t.is_alive() and not pauses and time.monotonic() < deadline:
                    reserved.append(PRIORITY.reserved)
                    time.sleep(0.001)
                t.join(timeout=2.0)
                done_during_short = not t.is_alive()
            t.join()
            assert done_during_short == (not pauses)
            assert len(run.tokens) == 200
            if not pauses:
                assert 1 in reserved                # its thread, while it decoded
                deadline = time.monotonic() + 10
                while PRIORITY.reserved and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert PRIORITY.reserved == 0       # given back once no stream runs
        finally:
            sched.close()


def _tasks() -> set:
    import os

    return set(os.listdir("/proc/self/task"))


def test_release_threads_lets_go_of_this_threads_openmp_workers():
    """GNU OpenMP keeps worker threads for every thread that ran a parallel region; once
    there are more than cores, every pool sleeps between regions (a decode step in the
    scheduler's thread on 2 threads took 41.6 ms against 19.5 with the main thread's pool
    let go). `release_threads` ends this thread's workers; `threads()` does it after a
    block on more than one thread."""
    import pytest

    from mmcore.lanes import can_release_threads, release_threads, threads

    if not can_release_threads():
        pytest.skip("torch does not run on GNU OpenMP here")
    x = torch.randn(4_000_000)
    seen = {}

    def work():
        torch.set_num_threads(2)
        before = _tasks()
        x.mul(2)                                   # a parallel region: this thread's pool
        seen["workers"] = _tasks() - before
        release_threads()
        seen["left"] = seen["workers"] & _tasks()
        with threads(2):
            x.mul(2)
            seen["in block"] = _tasks() - before
        seen["after block"] = seen["in block"] & _tasks()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["workers"] and not seen["left"]
    assert seen["in block"] and not seen["after block"]


def test_the_scheduler_decodes_on_every_core_unless_short_work_runs(tiny_kit):
    """`max_threads` while no short or long work runs, its kept `threads` while some does
    (which then runs on the other cores)."""
    lm = tiny_kit.model("causal_lm")
    counts, inner = [], lm.model.forward

    def counting(*args, **kwargs):
        counts.append(torch.get_num_threads())
        return inner(*args, **kwargs)

    params = G.SamplingParams(max_new_tokens=12, chat=False)
    sched = S.Scheduler(lm.model, lm.tokenizer, S.ServingConfig(threads=1, max_threads=2,
                                                                pause_for_short=False))
    lm.model.forward = counting
    try:
        list(sched.generate_tokens("Once upon a time", params))
        alone = counts[:]
        counts.clear()
        with PRIORITY.short():
            list(sched.generate_tokens("Once upon a time", params))
        beside_short = counts[:]
        counts.clear()
        with PRIORITY.long():                     # training, a gallery's embedding
            list(sched.generate_tokens("Once upon a time", params))
        beside_long = counts[:]
    finally:
        del lm.model.forward
        sched.close()
    assert alone and set(alone) == {2}
    assert beside_short and set(beside_short) == {1}
    assert beside_long and set(beside_long) == {1}
    # the defaults: every core alone where pools can be let go of, none on a GPU
    assert S.decode_threads_alone("cuda") == 0
    from mmcore.lanes import can_release_threads

    assert S.decode_threads_alone("cpu") == (max(S.decode_threads("cpu"), default_threads())
                                             if can_release_threads() else
                                             S.decode_threads("cpu"))


def test_app_handlers_let_go_of_the_openmp_workers_their_model_work_started():
    """A handler's thread (and a streamed handler's, after each step: Gradio may run each
    step on another thread) keeps no OpenMP workers, so none sleeps beside the
    scheduler's."""
    import pytest

    from demos.context import guarded
    from mmcore.lanes import can_release_threads

    if not can_release_threads():
        pytest.skip("torch does not run on GNU OpenMP here")
    x = torch.randn(4_000_000)
    seen = {}

    @guarded
    def handler():
        torch.set_num_threads(2)
        x.mul(2)
        seen["workers"] = _tasks() - seen["before"]
        return "done"

    @guarded
    def streamed():
        for i in range(2):
            torch.set_num_threads(2)
            x.mul(2)
            seen[f"step {i}"] = _tasks() - seen["before"]
            yield i

    def run():
        seen["before"] = _tasks()
        assert handler() == "done"
        seen["after handler"] = seen["workers"] & _tasks()
        for i in streamed():
            seen[f"after step {i}"] = seen[f"step {i}"] & _tasks()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["workers"] and not seen["after handler"]
    assert seen["step 0"] and not seen["after step 0"]
    assert seen["step 1"] and not seen["after step 1"]


def test_plain_decoding_and_loads_count_as_long_work(tiny_kit):
    """A scheduler keeps to its own threads while a model decodes outside it (one loaded at
    run time, batching off) or a model loads."""
    lm = tiny_kit.model("causal_lm")
    params = G.SamplingParams(max_new_tokens=3, chat=False)
    during = [PRIORITY.quiet() for _ in lm.generate_tokens("Once upon a time", params)]
    assert during == [False] * 3 and PRIORITY.quiet()
    steps = lm.stream("Once upon a time", params)
    next(steps)
    assert not PRIORITY.quiet()
    steps.close()                                  # a closed stream ends its long work
    assert PRIORITY.quiet()


def test_the_main_thread_keeps_its_pool_unless_a_scheduler_runs():
    import pytest

    from mmcore.lanes import can_release_threads, release_threads, threads

    if not can_release_threads() or threading.current_thread() is not threading.main_thread():
        pytest.skip("needs GNU OpenMP and the main thread")
    # an earlier test's scheduler idles up to its idle_seconds (30 s) before it exits
    import time
    deadline = time.monotonic() + 90
    while PRIORITY.decoders and time.monotonic() < deadline:
        time.sleep(0.2)
    assert PRIORITY.decoders == 0, "a scheduler of an earlier test never went idle"
    x = torch.randn(4_000_000)
    release_threads()                              # whatever earlier tests left
    before = _tasks()
    with threads(2):
        x.mul(2)
    kept = _tasks() - before
    assert kept                                    # plain Python: no new pool per call
    with PRIORITY.decoding():                      # a scheduler runs
        with threads(2):
            x.mul(2)
        assert not (kept & _tasks())               # serving: let go


def test_a_gallerys_embedding_counts_as_long_work(tiny_kit, chelsea):
    """The app embeds galleries through `Index.add`, not the kit's method."""
    from mmcore.index import Index

    encoder = tiny_kit.encoder()
    seen, inner = [], encoder.encode_images

    def watching(images):
        seen.append(PRIORITY.quiet())
        return inner(images)

    index = Index(encoder)
    encoder.encode_images = watching
    try:
        report = index.add([chelsea])
    finally:
        del encoder.encode_images
    assert report["added"] == 1 and seen == [False] and PRIORITY.quiet()
