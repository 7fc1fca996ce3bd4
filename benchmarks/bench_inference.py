"""Inference latency side by side, per variant, in one run: PyTorch eager, ``optimize()``
(optionally ``torch.compile``d), onnxruntime, and automl's model under ``tf.function`` when an
automl checkout and TensorFlow are present; plus pre- and post-processing.

Batch 1 at each variant's native size, random weights unless --weights (the network's latency does
not depend on them; post-processing's does). Each network path runs in its own process, as users
run them (runtimes in one process slow each other: onnxruntime took 8% longer on d4 once
TensorFlow was loaded beside it). The paths are timed round-robin (one call of each per round) so
that a shared machine's load hits them alike, with a short pause between calls; each gets
--warmup untimed calls first. Post-processing is timed as ``predict()`` runs it: on the outputs
of a PyTorch forward pass made just before (not timed). Prints a table (median, spread =
min..max of the middle half, ratio to TF) and writes --json.

    python benchmarks/bench_inference.py --variants efficientdet-d0 --automl-dir ../automl \\
        --json bench-d0.json

CUDA: ``--device cuda --dtype fp16|bf16`` runs the PyTorch paths in that precision (the ONNX and
TF paths stay on CPU fp32 and are skipped).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import EfficientDet, flatten_outputs  # noqa: E402
from model.postprocess import NmsConfig, postprocess  # noqa: E402
from model.preprocess import load_image, preprocess_batch  # noqa: E402

# Seconds between two timed calls: runtimes keep their idle threads spinning for a while after a
# call (onnxruntime's made the next call, in another process, up to 2x slower).
PAUSE_S = 0.05
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE = ROOT.parent / "shared" / "reference" / "img1.jpg"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(run: Callable[[], object]) -> Callable[[], float]:
    """``run`` as a path: returns the seconds one call takes."""
    def call() -> float:
        started = time.perf_counter()
        run()
        return time.perf_counter() - started
    return call


def torch_path(module: torch.nn.Module, images: torch.Tensor, device: str) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            module(images)
        _sync(device)
    return run


def postprocess_path(model: EfficientDet, image_path: Path) -> Callable[[], float]:
    """automl's global post-processing of the image's head outputs, fresh from a forward pass
    (untimed) before each timed call."""
    config = model.config
    image = load_image(image_path)
    batch, scales = preprocess_batch([image], config.image_size, config.mean_rgb,
                                     config.stddev_rgb)
    nms = NmsConfig.from_dict(config.nms_configs)
    net = model.to("cpu", torch.float32)

    def call() -> float:
        with torch.inference_mode():
            cls_logits, box_deltas = flatten_outputs(*net(batch))
            started = time.perf_counter()
            postprocess("global", cls_logits, box_deltas, model.anchors.boxes_yxyx,
                        config.image_size, scales, nms)
        return time.perf_counter() - started
    return call


def onnx_path(model: EfficientDet, images: torch.Tensor, threads: int, workdir: Path
              ) -> tuple[Callable[[], None], float]:
    import onnxruntime as ort
    from converter.export import export_model
    path = workdir / f"{model.config.name}.onnx"
    started = time.perf_counter()
    export_model(model, "onnx", path, outputs="levels")   # per-level maps, as the other paths
    export_seconds = time.perf_counter() - started
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"images": images.numpy()}
    return (lambda: session.run(None, feed)), export_seconds


def tf_path(model: EfficientDet, threads: int, automl_dir: Path) -> Callable[[], None]:
    """automl's EfficientDetModel (raw head outputs) under tf.function, NHWC fp32."""
    from verify.tf_live import (_automl_config, _efficientdet_dir, _import_automl,
                                _import_tensorflow)
    tf = _import_tensorflow()
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    automl = _import_automl(_efficientdet_dir(automl_dir))
    tf_config = _automl_config(automl, model.config)
    tf.keras.backend.clear_session()
    net = automl.efficientdet_keras.EfficientDetModel(config=tf_config)
    height, width = model.config.image_size
    net.build((1, height, width, 3))
    call = tf.function(lambda x: net(x, training=False))
    images = tf.random.normal((1, height, width, 3))

    def run() -> None:
        outputs = call(images)
        tf.nest.map_structure(lambda t: t.numpy(), outputs)
    return run


def summarize(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    quarter = len(ordered) // 4
    middle = ordered[quarter:len(ordered) - quarter] or ordered
    return {"median_ms": statistics.median(ordered) * 1e3, "low_ms": middle[0] * 1e3,
            "high_ms": middle[-1] * 1e3, "runs": len(ordered)}


NETWORK_PATHS = {"eager": "eager", "optimized": "optimized", "compiled": "compiled",
                 "onnx": "onnxruntime", "tf": "tf.function"}


def load_model(variant: str, args: argparse.Namespace) -> EfficientDet:
    return EfficientDet.from_pretrained(args.weights) if args.weights else \
        EfficientDet.from_config(variant).eval()


def network_path(path: str, variant: str, args: argparse.Namespace, workdir: Path
                 ) -> tuple[Callable[[], float], dict[str, float]]:
    """The timed call of one network path (``--paths`` name) and its one-off figures."""
    device, dtype = args.device, DTYPES[args.dtype]
    model = load_model(variant, args)
    height, width = model.config.image_size
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    notes: dict[str, float] = {}
    if path == "onnx":
        run, notes["onnx_export_s"] = onnx_path(model, images, args.threads, workdir)
        return timed(run), notes
    if path == "tf":
        return timed(tf_path(model, args.threads, args.automl_dir)), notes
    net = model.to(device, dtype)
    module = {"eager": lambda: net, "optimized": net.optimize,
              "compiled": lambda: net.optimize(compile=True)}[path]()
    run = torch_path(module, images.to(device, dtype), device)
    if path == "compiled":
        started = time.perf_counter()
        run()
        notes["compile_first_call_s"] = time.perf_counter() - started
    return timed(run), notes


def serve_path(path: str, variant: str, args: argparse.Namespace, workdir: Path,
               connection: Any) -> None:
    """Worker process: build one network path, then time one call per "run" message."""
    torch.set_num_threads(args.threads)
    try:
        call, notes = network_path(path, variant, args, workdir)
    except Exception as error:  # reported by the parent, which stops the benchmark
        connection.send(("error", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", notes))
    while connection.recv() == "run":
        connection.send(call())


class PathProcess:
    """A network path in its own (spawned) process."""

    def __init__(self, path: str, variant: str, args: argparse.Namespace, workdir: Path):
        context = multiprocessing.get_context("spawn")
        self.name = path
        self.connection, remote = context.Pipe()
        self.process = context.Process(target=serve_path, daemon=True,
                                       args=(path, variant, args, workdir, remote))
        self.process.start()
        status, self.notes = self.connection.recv()
        if status == "error":
            raise SystemExit(f"error: {path}: {self.notes}")

    def __call__(self) -> float:
        self.connection.send("run")
        try:
            return float(self.connection.recv())
        except EOFError:
            raise SystemExit(f"error: the {self.name} process died "
                             f"(exit code {self.process.exitcode})") from None

    def close(self) -> None:
        self.connection.send("stop")
        self.process.join()


def wanted_paths(args: argparse.Namespace) -> list[str]:
    """``--paths`` less those this machine or precision cannot run."""
    cpu_fp32 = args.device == "cpu" and args.dtype == "fp32"
    available = {"onnx": cpu_fp32 and importlib.util.find_spec("onnxruntime") is not None,
                 "tf": cpu_fp32 and args.automl_dir is not None}
    return [path for path in args.paths if available.get(path, True)]


def bench_variant(variant: str, args: argparse.Namespace, workdir: Path) -> dict:
    model = load_model(variant, args)
    height, width = model.config.image_size
    workers = {NETWORK_PATHS[path]: PathProcess(path, variant, args, workdir)
               for path in wanted_paths(args)}
    paths: dict[str, Callable[[], float]] = dict(workers)
    image = load_image(args.image)
    paths["preprocess"] = timed(lambda: preprocess_batch(
        [image], model.config.image_size, model.config.mean_rgb, model.config.stddev_rgb))
    paths["postprocess global"] = postprocess_path(model, args.image)

    for call in paths.values():
        for _ in range(args.warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.runs):
        for name, call in paths.items():
            time.sleep(PAUSE_S)
            times[name].append(call())
    notes = {key: value for worker in workers.values() for key, value in worker.notes.items()}
    for worker in workers.values():
        worker.close()
    results = {name: summarize(values) for name, values in times.items()}
    reference = results.get("tf.function")
    for stats in results.values():
        stats["ratio_to_tf"] = stats["median_ms"] / reference["median_ms"] if reference else None
    return {"variant": model.config.name, "image_hw": [height, width], "paths": results, **notes}


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["efficientdet-d0"])
    parser.add_argument("--paths", nargs="+", default=["eager", "optimized", "onnx", "tf"],
                        choices=["eager", "optimized", "compiled", "onnx", "tf"],
                        help="network paths to time ('compiled' = optimize(compile=True); its "
                             "first call is reported separately)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="PyTorch paths' precision (fp16/bf16 on CUDA)")
    parser.add_argument("--automl-dir", type=Path, default=os.environ.get("EFFDET_AUTOML_DIR"),
                        help="google/automl checkout: adds automl's model under tf.function")
    parser.add_argument("--image", type=Path, default=IMAGE,
                        help="image for the pre- and post-processing timings")
    parser.add_argument("--weights", type=Path, default=None,
                        help="converted weights (.pth) for one variant instead of random ones: "
                             "post-processing time depends on how many anchors pass the score "
                             "threshold (with random weights all of them)")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = parser.parse_args()
    if args.dtype != "fp32" and args.device != "cuda":
        parser.error("--dtype fp16/bf16 is for --device cuda")
    if args.weights is not None and len(args.variants) != 1:
        parser.error("--weights goes with one --variants entry")
    torch.set_num_threads(args.threads)
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "variants": []}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for variant in args.variants:
            try:
                result = bench_variant(variant, args, Path(tmp))
            except (ValueError, KeyError, OSError) as error:
                raise SystemExit(f"error: {variant}: {error}") from None
            report["variants"].append(result)
            print(f"{result['variant']} {result['image_hw'][0]}x{result['image_hw'][1]}, "
                  f"{args.threads} threads, {args.runs} runs, load {os.getloadavg()[0]:.1f}")
            print(f"  {'path':<20} {'median ms':>10} {'spread ms':>17} {'x TF':>6}")
            for name, stats in result["paths"].items():
                ratio = f"{stats['ratio_to_tf']:.2f}" if stats["ratio_to_tf"] else "-"
                print(f"  {name:<20} {stats['median_ms']:>10.1f} "
                      f"{stats['low_ms']:>8.1f}..{stats['high_ms']:<8.1f} {ratio:>6}")
            for key in ("compile_first_call_s", "onnx_export_s"):
                if key in result:
                    print(f"  {key}: {result[key]:.1f}")
    report["machine"]["load_avg_end"] = os.getloadavg()
    if args.json is not None:
        from model.weights_io import atomic_path
        with atomic_path(args.json) as tmp_name:
            Path(tmp_name).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
