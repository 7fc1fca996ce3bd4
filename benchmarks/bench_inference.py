"""PyTorch network latency on CPU, batch 1, fp32, at each variant's native size.

Prints ms per image (median of --runs after --warmup) and, for d0/d4, the ratio to automl's
model under tf.function on 2 cores as measured for this project (d0 ~91 ms, d4 ~1.4 s; these are
recorded figures, so compare ratios only when measured on the same kind of machine).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from model import EfficientDet

TF_FUNCTION_SECONDS = {"efficientdet-d0": 0.091, "efficientdet-d4": 1.4}


def bench(variant: str, runs: int, warmup: int) -> float:
    model = EfficientDet.from_config(variant).eval()
    height, width = model.config.image_size
    image = torch.randn(1, 3, height, width)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            start = time.perf_counter()
            model(image)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["efficientdet-d0", "efficientdet-d4"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for variant in args.variants:
        seconds = bench(variant, args.runs, args.warmup)
        line = f"{variant}: {seconds * 1000:.0f} ms/image ({args.threads} threads)"
        if variant in TF_FUNCTION_SECONDS:
            line += f", {seconds / TF_FUNCTION_SECONDS[variant]:.2f}x automl tf.function"
        print(line)


if __name__ == "__main__":
    main()
