"""Models loaded into a role at run time: the operator's policy, background loading with a
status, honest checks, and least-recently-used release past a memory budget."""

import json
import shutil

import pytest
import torch

from mmcore import InputError, tiny
from mmcore.model_pool import ModelPool, read_allowed


@pytest.fixture(scope="module")
def other_gpt2(tmp_path_factory):
    """A second tiny GPT-2 (different weights), as a user's own folder."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("other-gpt2")
    shutil.copytree(tiny.folder("gpt2"), folder, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def second_folder(other_gpt2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("third-gpt2")
    shutil.copytree(other_gpt2, folder, dirs_exist_ok=True)
    return str(folder)


def test_a_listed_folder_loads_in_the_background_and_answers(tiny_kit, other_gpt2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pool = ModelPool(tiny_kit, allowed={"causal_lm": [other_gpt2]})
    assert pool.choices("causal_lm") == [other_gpt2]
    assert pool.status("causal_lm", other_gpt2) == "not loaded"
    pool.request("causal_lm", other_gpt2, wait=True)
    assert pool.status("causal_lm", other_gpt2) == "ready"
    got = pool.kit("causal_lm", other_gpt2).generate("the cat", max_new_tokens=8)
    tok = AutoTokenizer.from_pretrained(other_gpt2)
    ref = AutoModelForCausalLM.from_pretrained(other_gpt2)
    ids = tok("the cat", return_tensors="pt").input_ids
    want = ref.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert got == tok.decode(want, skip_special_tokens=True)
    assert got != tiny_kit.generate("the cat", max_new_tokens=8)      # another model indeed


def test_policy_refuses_what_the_operator_did_not_allow(tiny_kit, other_gpt2):
    closed = ModelPool(tiny_kit)
    with pytest.raises(InputError, match="Loading models is off"):
        closed.request("causal_lm", "distilgpt2")
    open_pool = ModelPool(tiny_kit, open_loading=True)
    for folder in (other_gpt2, "../etc", "/etc", "~/models", "a/b/c"):
        with pytest.raises(InputError, match="Only hub ids"):
            open_pool.request("causal_lm", folder)
    with pytest.raises(InputError, match="Unknown role"):
        open_pool.request("painter", "gpt2")
    with pytest.raises(InputError, match="not a model name"):
        open_pool.request("causal_lm", "gpt2\nrm -rf")


def test_a_hub_id_that_cannot_load_reports_why(tiny_kit):
    pool = ModelPool(tiny_kit, open_loading=True)
    pool.request("causal_lm", "nobody/no-such-model", wait=True)
    status = pool.status("causal_lm", "nobody/no-such-model")
    assert status.startswith("error: ") and "no-such-model" in status
    with pytest.raises(InputError, match="not loadable"):
        pool.kit("causal_lm", "nobody/no-such-model")


def test_the_least_recently_used_model_goes_past_the_budget(tiny_kit, other_gpt2, second_folder):
    pool = ModelPool(tiny_kit, allowed={"causal_lm": [other_gpt2, second_folder]}, budget_mb=0)
    pool.request("causal_lm", other_gpt2, wait=True)
    assert pool.extra_mb()[f"causal_lm: {other_gpt2}"] > 0
    pool.request("causal_lm", second_folder, wait=True)
    assert pool.status("causal_lm", second_folder) == "ready"
    assert pool.status("causal_lm", other_gpt2) == "not loaded"          # released
    assert list(pool.extra_mb()) == [f"causal_lm: {second_folder}"]


def test_the_operators_file_is_checked(tmp_path):
    good = tmp_path / "models.json"
    good.write_text(json.dumps({"causal_lm": ["distilgpt2", " gpt2 "]}))
    assert read_allowed(good) == {"causal_lm": ["distilgpt2", "gpt2"]}
    for body, message in (('{"painter": ["x"]}', "unknown role"), ('["gpt2"]', "expected an object"),
                          ('{"causal_lm": "gpt2"}', "must list"), ("{", "not a readable JSON")):
        bad = tmp_path / "bad.json"
        bad.write_text(body)
        with pytest.raises(InputError, match=message):
            read_allowed(bad)
