"""Conversion cost of the largest model against TF's own checkpoint reader.

Prints two ratios for efficientdet-d7x (override with --variant):
  time   = convert (read + map + write .pth) / TF reader loading every tensor
  memory = peak RSS above the interpreter's baseline (after imports) / fp32 model size
Targets: time <= 1.5x, memory <= 2x. Each measurement runs in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child_tf_read(prefix: str) -> dict:
    import tensorflow as tf
    baseline = rss_mb()
    start = time.perf_counter()
    reader = tf.train.load_checkpoint(prefix)
    total = 0
    for name in reader.get_variable_to_shape_map():
        total += reader.get_tensor(name).nbytes
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "bytes": total, "baseline_mb": baseline, "peak_mb": peak}


def child_convert(ckpt_dir: str, out: str) -> dict:
    import tensorflow  # noqa: F401  (imported before the baseline, as convert needs it)
    import torch  # noqa: F401
    from converter.convert import convert_checkpoint
    from converter.detect import detect_config
    from converter.readers import read_checkpoint
    from model.weights_io import save_weights
    baseline = rss_mb()
    start = time.perf_counter()
    contents = read_checkpoint(ckpt_dir)
    config = detect_config(contents.names, source=Path(ckpt_dir))
    state_dict, report = convert_checkpoint(contents, config)
    save_weights(out, state_dict, {"config": config.to_dict()})
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(v.numel() for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    return {"seconds": seconds, "model_mb": params * 4 / 2**20, "baseline_mb": baseline,
            "peak_mb": peak, "tensors": report.converted}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="efficientdet-d7x")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_tf_read(*rest) if kind == "tf" else child_convert(*rest)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt" / "model.ckpt"
        subprocess.run([sys.executable, str(args.reference / "synth_ckpt.py"), "--manifest",
                        str(args.reference / args.variant / "manifest.json"), "--seed", "0",
                        "--out", str(ckpt)], check=True, capture_output=True)
        tf_read = min((run_child("tf", str(ckpt)) for _ in range(2)), key=lambda r: r["seconds"])
        conv = min((run_child("convert", str(ckpt.parent), str(Path(tmp) / "out.pth"))
                    for _ in range(2)), key=lambda r: r["seconds"])
    extra = conv["peak_mb"] - conv["baseline_mb"]
    print(f"variant: {args.variant}, {conv['tensors']} tensors, fp32 model {conv['model_mb']:.0f} MB")
    print(f"TF reader, every tensor ({tf_read['bytes'] / 2**20:.0f} MB): {tf_read['seconds']:.2f} s")
    print(f"convert (read + map + write .pth): {conv['seconds']:.2f} s")
    print(f"time ratio convert / TF read: {conv['seconds'] / tf_read['seconds']:.2f} (target <= 1.5)")
    print(f"peak memory above baseline: {extra:.0f} MB")
    print(f"memory ratio / fp32 model size: {extra / conv['model_mb']:.2f} (target <= 2.0)")


if __name__ == "__main__":
    main()
