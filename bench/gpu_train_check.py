"""GPU check of fine-tuning (issue 13.4), under 3 minutes: the tiny kit fine-tuned with both
towers trained (images decoded by DataLoader workers) on 1 GPU, then on 2 GPUs under torchrun
when there are two, asserting that each rank trains on its own device. Prints the device, the
autocast dtype seen inside the towers, and steps/s. Imports only what training needs (torch,
transformers, accelerate, safetensors, PIL): no gradio, no timm.

    python bench/gpu_train_check.py            # on a CUDA machine
    python bench/gpu_train_check.py --cpu      # the same path on the CPU (a dry run)
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MMCORE_CACHE", str(Path(tempfile.gettempdir()) / "mmcore-gpu-check"))


def tower_dtypes() -> tuple:
    """(set of output dtypes of every nn.Linear run while it is active, remove handle)."""
    import torch

    seen = set()

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear) and torch.is_tensor(output) and \
                torch.is_grad_enabled():
            seen.add(str(output.dtype).replace("torch.", ""))

    return seen, torch.nn.modules.module.register_module_forward_hook(hook)


def run(kit, data, out, epochs: int, label: str, rank: int = 0) -> dict:
    import mmcore
    from mmcore.device import autocast_dtype

    enc = kit.encoder()
    seen, handle = tower_dtypes()
    start = time.perf_counter()
    result = mmcore.finetune(kit, data, out, epochs=epochs, batch_size=16, train="image",
                             lr=1e-4, resume="never", workers=2)
    wall = time.perf_counter() - start
    handle.remove()
    steps = len(result.history)
    assert result.checkpoint is not None and steps, result.reason
    loop = result.history[-1]["seconds"]
    info = {"label": label, "rank": rank, "device": str(enc.device),
            "autocast": str(autocast_dtype(enc.device)).replace("torch.", ""),
            "tower dtypes": sorted(seen), "steps": steps, "steps/s": round(steps / loop, 2),
            "wall s": round(wall, 1), "last loss": round(result.history[-1]["loss"], 4)}
    if enc.device.type == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(enc.device)
        info["peak MiB"] = round(torch.cuda.max_memory_allocated(enc.device) / 2**20)
        want = info["autocast"]
        assert want in seen, f"towers ran in {seen}, not under {want} autocast"
    print(info, flush=True)
    return info


def child(data: str, out: str) -> None:
    """One torchrun rank: one device per process, checked before and after training."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    import mmcore

    state = PartialState()                  # sets the device from LOCAL_RANK, starts NCCL
    kit = mmcore.load_kit("tiny")
    enc = kit.encoder()
    assert torch.cuda.current_device() == state.local_process_index, \
        (torch.cuda.current_device(), state.local_process_index)
    assert enc.device.index == state.local_process_index, (enc.device, state.local_process_index)
    run(kit, data, out, 20, f"{state.num_processes} GPUs", state.process_index)
    devices = gather_object([enc.device.index])
    assert len(set(devices)) == state.num_processes, f"ranks share devices: {devices}"
    if state.is_main_process:
        print(f"OK: {state.num_processes} ranks on devices {devices}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU")
    p.add_argument("--child", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return 0
    import torch

    import mmcore
    from mmcore import demo_data

    if args.cpu:
        os.environ["MMCORE_DEVICE"] = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for a dry run")
        return 1
    work = Path(tempfile.mkdtemp(prefix="mmcore-gpu-check-"))
    data = demo_data.make(work / "data", photos=False)
    kit = mmcore.load_kit("tiny")
    run(kit, data, work / "one", 20, "1 device")
    if args.cpu or torch.cuda.device_count() < 2:
        print(f"{torch.cuda.device_count()} GPU(s): the 2-GPU check needs two; skipped")
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           __file__, "--child", str(data), str(work / "two")]
    return subprocess.run(cmd, timeout=150).returncode


if __name__ == "__main__":
    raise SystemExit(main())
