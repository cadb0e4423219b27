"""What `helpers.runtime.tune_cpu()` buys: EfficientNet-Lite0 inference with and without it.

glibc's allocator settings cannot be undone inside a process, so each measurement runs in a fresh
subprocess; the two variants alternate (A B A B ...) so that a noisy neighbour hits both alike.

    python benchmarks/cpu_tuning.py                  # 224 px, batch 64, 3 rounds
    python benchmarks/cpu_tuning.py --rounds 5 --batches 4

Prints images/s per round and the ratio of the medians (tuned / default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time, torch
from helpers.models import create_model
from helpers.runtime import tune_cpu
if sys.argv[1] == "tuned":
    tune_cpu()
size, batch, batches = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = create_model("efficientnet_lite0", None).eval().to(memory_format=torch.channels_last)
x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    model(x)  # warm-up: first-call allocations and kernel choice
    started = time.perf_counter()
    for _ in range(batches):
        model(x)
    seconds = time.perf_counter() - started
print(json.dumps({"images_per_second": batch * batches / seconds}))
"""


def measure(variant: str, size: int, batch: int, batches: int) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, variant, str(size), str(batch), str(batches)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs = {"default": [], "tuned": []}
    for round_ in range(args.rounds):
        for variant in runs:
            runs[variant].append(measure(variant, args.image_size, args.batch_size, args.batches))
            print(f"round {round_ + 1} {variant:>7}: {runs[variant][-1]:.1f} img/s", flush=True)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({"default_img_per_s": round(medians["default"], 1), "tuned_img_per_s": round(medians["tuned"], 1),
                      "ratio": round(medians["tuned"] / medians["default"], 2), "rounds": args.rounds}))


if __name__ == "__main__":
    main()
