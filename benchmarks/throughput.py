"""Training-step throughput of the GPU path: fp32 vs mixed precision, contiguous vs channels_last.

    python benchmarks/throughput.py                      # the best device available
    python benchmarks/throughput.py --device cpu --sizes 160

For each image size and setting, times full fine-tuning steps of EfficientNet-Lite0 (AdamW,
batch 32 on CPU / 128 on CUDA) after warm-up, and prints images per second (median of the timed
steps) and the speed-up of each setting over fp32 + contiguous, all measured in one process.
Mixed precision is bf16 where the GPU supports it, else fp16 with a grad scaler (as in `fit`);
on CPU only the memory-format comparison runs.
"""

from __future__ import annotations

import argparse
import json

import torch

from helpers.models import create_model
from helpers.runtime import amp_dtype, pick_device, training_steps_per_second


def time_steps(device: torch.device, size: int, batch: int, dtype: torch.dtype | None, channels_last: bool,
               steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2).to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 2, (batch,), device=device)
    return training_steps_per_second(model, x, y, device, dtype, steps, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    batch = 128 if cuda else 32
    steps, warmup = (args.steps or (30 if cuda else 4)), (10 if cuda else 1)
    if cuda:
        torch.backends.cudnn.benchmark = True
    low = amp_dtype(device)
    settings = [("fp32", None, False), ("fp32", None, True)]
    if low is not None:
        name = str(low).replace("torch.", "")
        settings += [(name, low, False), (name, low, True)]

    where = f" ({torch.cuda.get_device_name()})" if cuda else f", {torch.get_num_threads()} threads"
    print(f"device {device}" + where
          + f", torch {torch.__version__}, batch {batch}, {steps} timed steps")
    rows = []
    for size in args.sizes:
        base = None
        for name, dtype, channels_last in settings:
            rate = time_steps(device, size, batch, dtype, channels_last, steps, warmup)
            base = base or rate
            row = {"size": size, "precision": name, "channels_last": channels_last,
                   "images_per_second": round(rate, 1), "speedup_vs_fp32_contiguous": round(rate / base, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
