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
