"""Check the GPU path in minutes, the first time a CUDA GPU is available.

    python benchmarks/gpu_check.py                 # about 4 minutes on an H200
    python benchmarks/gpu_check.py --skip-course   # throughput and export only, under a minute

Prints one table:
- training-step throughput of EfficientNet-Lite0 at 224 px (forward + backward + AdamW step, batch
  128): fp32 / bf16 / fp16 with a GradScaler, each contiguous and channels_last, timed by
  `benchmarks/throughput.py`'s ``time_steps``;
- the course at its GPU budget (``python -m helpers.course --name gpu``): wall time and test accuracy
  from ``runs/gpu/metrics.json``;
- ``helpers.predict`` with the run's final model (``final.pt``: what ``metrics.json`` scored) exported to
  ``.pt2`` and loaded on CUDA (``helpers.export.load_exported(path, device="cuda")``): images per second
  over the test split and its accuracy, which must match the course's;
- peak GPU memory of the rows measured in this process (the course runs in its own processes).

Without a CUDA device it prints why and exits with status 2, before importing the workbook.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

NO_GPU_EXIT = 2
ROOT = Path(__file__).resolve().parents[1]
COURSE_TIMEOUT_S = 240  # the whole check must stay under 5 minutes


def throughput_rows(steps: int) -> list[dict]:
    """fp32 / bf16 / fp16 (+GradScaler) x contiguous / channels_last, 224 px, batch 128."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import time_steps  # one timing function for both benchmarks

    device, rows = torch.device("cuda"), []
    torch.backends.cudnn.benchmark = True
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16 + GradScaler", torch.float16)):
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            rows.append({"check": "train step 224 px", "setting": name, "note": "bf16 not supported"})
            continue
        for channels_last in (False, True):
            torch.cuda.reset_peak_memory_stats()
            rate = time_steps(device, 224, 128, dtype, channels_last, steps, warmup=10)
            rows.append({"check": "train step 224 px, batch 128", "setting": f"{name}, "
                         f"{'channels_last' if channels_last else 'contiguous'}", "images/s": round(rate),
                         "peak GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
    return rows


def course_row(name: str) -> dict:
    """Run the course at its GPU budget in a subprocess; wall time and test accuracy."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "helpers.course", "--name", name]
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=COURSE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"check": "course (GPU budget)", "setting": " ".join(command[1:]),
                "note": f"stopped after {COURSE_TIMEOUT_S} s"}
    wall = round(time.perf_counter() - started)
    if result.returncode != 0:
        return {"check": "course (GPU budget)", "setting": " ".join(command[1:]), "wall s": wall,
                "note": f"failed ({result.returncode}): {result.stderr.strip().splitlines()[-1:]}"}
    metrics = json.loads((ROOT / "runs" / name / "metrics.json").read_text())
    return {"check": "course (GPU budget)", "setting": " ".join(command[1:]), "wall s": wall,
            "test accuracy": round(metrics["test_accuracy"], 4)}


def export_row(name: str) -> dict:
    """Export the run's final model (``final.pt``, the one notebook 05 scored) to .pt2, load it on CUDA and
    label the test split."""
    import pandas as pd

    from helpers.checkpoint import model_from_checkpoint
    from helpers.export import export_model, load_exported
    from helpers.predict import predict_folder

    run = ROOT / "runs" / name
    if not (run / "final.pt").is_file():
        return {"check": "predict .pt2 on CUDA", "note": f"no {run / 'final.pt'}: run the course first"}
    model, ckpt = model_from_checkpoint(run / "final.pt")
    path = export_model(model, ckpt, run / "gpu_check.pt2")
    module, meta = load_exported(path, device="cuda")
    root = Path(json.loads((run / "dataset.json").read_text())["root"])
    test = pd.read_csv(run / "test.csv", dtype=str)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    table, errors = predict_folder(module, meta, [root / f for f in test["file"]], root, batch_size=256,
                                   device="cuda")
    seconds = time.perf_counter() - started
    accuracy = float((table["predicted"].to_numpy() == test["label"].to_numpy()).mean()) if not errors else None
    return {"check": "predict .pt2 on CUDA", "setting": f"{len(table)} test images, batch 256, files read",
            "images/s": round(len(table) / seconds), "test accuracy": accuracy and round(accuracy, 4),
            "peak GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "note": f"{len(errors)} unreadable" if errors else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="gpu", help="run folder of the course (default: gpu)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per setting")
    parser.add_argument("--skip-course", action="store_true", help="only throughput and, if a run exists, export")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check. Run it on a "
              f"machine with an NVIDIA GPU and a CUDA build of torch (this one: torch {torch.__version__}).",
              file=sys.stderr)
        return NO_GPU_EXIT
    started = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    rows = throughput_rows(args.steps)
    if not args.skip_course:
        rows.append(course_row(args.name))
    rows.append(export_row(args.name))
    import pandas as pd

    from helpers.course import markdown_table

    print(markdown_table(pd.DataFrame(rows).fillna("")))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
