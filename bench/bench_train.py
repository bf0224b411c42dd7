"""Fine-tuning speed of the offline kit on the CPU: samples/s with both towers frozen (their
features cached once, so steps cost only the heads) and with the text tower trained, and the
ratio between them. Runs on the bundled demo set.

    .venv/bin/python bench/bench_train.py [--epochs 3]
"""

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()

    import mmcore
    from mmcore import demo_data

    kit = mmcore.load_kit("offline")
    kit.encoder()
    # the demo set and both fine-tuned models (tens of MB each) go when the run ends
    work = Path(tempfile.mkdtemp(prefix="mmcore-bench-train-"))
    atexit.register(shutil.rmtree, work, True)
    data = demo_data.make(work / "data")
    rates = {}
    for part in ("projections", "text"):
        start = time.perf_counter()
        result = mmcore.finetune(kit, data, work / part, epochs=args.epochs,
                                 batch_size=args.batch_size, train=part)
        wall = time.perf_counter() - start
        samples = len(result.history) * args.batch_size
        loop = result.history[-1]["seconds"]
        rates[part] = samples / loop
        print(f"{part:12s} {samples} samples: training loop {samples / loop:8.1f} samples/s, "
              f"end to end (incl. feature caching and evaluation) {samples / wall:6.1f} samples/s")
    print(f"ratio frozen towers / text tower trained: {rates['projections'] / rates['text']:.1f}x")


if __name__ == "__main__":
    main()
