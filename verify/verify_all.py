"""``make verify-all``: synthesize, convert and verify every golden in a reference folder.

For each ``<REF>/<name>/golden*.json``: write the TF checkpoint it was made from with the
reference's ``synth_ckpt.py`` (seed and EMA as the golden records), convert it with
``convert``, run ``verify parity``, and print one summary row. Exits 1 if any fails.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from verify.cli_utils import CONTEXT_SETTINGS


@dataclass
class Case:
    name: str
    folder: Path
    stem: str
    manifest: Path
    seed: int
    ema: bool


def find_manifest(folder: Path, recorded: str | None, search: list[Path]) -> Path | None:
    """The golden's manifest: next to it, in a search folder by name, or at the recorded
    repo-relative path resolved against the folder's ancestors."""
    candidates = [folder / "manifest.json", *(s / folder.name / "manifest.json" for s in search)]
    if recorded:
        candidates += [parent / recorded for parent in folder.parents]
    return next((c for c in candidates if c.is_file()), None)


def find_cases(ref: Path, manifests: list[Path]) -> list[Case]:
    cases = []
    for golden_json in sorted(ref.glob("*/golden*.json")):
        golden = json.loads(golden_json.read_text())
        folder = golden_json.parent
        manifest = find_manifest(folder, golden.get("manifest"), [ref, *manifests])
        if manifest is None:
            raise click.ClickException(f"{golden_json}: manifest not found")
        stem = golden_json.stem
        label = folder.name + ("" if stem == "golden" else f" ({stem})")
        cases.append(Case(label, folder, stem, manifest, int(golden["seed"]),
                          bool(golden.get("ema", True))))
    return cases


def run_case(case: Case, synth: Path, work: Path, parity_flags: tuple[str, ...] = ()) -> dict:
    started = time.perf_counter()
    ckpt = work / case.name.replace(" ", "_") / "model.ckpt"
    weights = ckpt.parent / "weights.pth"
    report = ckpt.parent / "parity.json"
    steps = [
        [sys.executable, str(synth), "--manifest", str(case.manifest), "--seed", str(case.seed),
         "--out", str(ckpt), "--no-optimizer", *([] if case.ema else ["--no-ema"])],
        [sys.executable, "-m", "converter", "--ckpt", str(ckpt.parent), "--out", str(weights),
         "--quiet", "--force"],
        [sys.executable, "-m", "verify", "parity", "--weights", str(weights), "--golden",
         str(case.folder), "--golden-name", case.stem, "--report", str(report), "--quiet", *parity_flags],
    ]
    # A reused work dir must not lend this run an earlier run's outputs.
    for stale in (weights, report):
        stale.unlink(missing_ok=True)
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        # parity exits 1 on a mismatch and still writes its report; anything else is an error.
        allowed = (0, 1) if step is steps[-1] else (0,)
        if done.returncode not in allowed or (step is steps[-1] and not report.exists()):
            tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            return {"name": case.name, "ok": False, "error": f"{Path(step[1]).name}: {tail}",
                    "seconds": time.perf_counter() - started}
    data = json.loads(report.read_text())
    if data["ok"] != (done.returncode == 0):
        return {"name": case.name, "ok": False, "seconds": time.perf_counter() - started,
                "error": f"parity exit code {done.returncode} disagrees with its report"}
    taps = data["taps"]
    return {"name": case.name, "ok": data["ok"],
            "taps": f"{sum(t['ok'] for t in taps)}/{len(taps)}",
            "worst": max((t["rel_max"] for t in taps), default=0.0),
            "detections": ", ".join(f"{d['path']} {d['matched']}/{d['expected']}"
                                    for d in data["detections"]),
            "first_divergence": data["first_divergence"],
            "unavailable": len(data.get("unavailable", [])),
            "seconds": time.perf_counter() - started}


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--ref", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=Path("../shared/reference"), help="Folder of <variant>/golden* folders.")
@click.option("--manifests", type=click.Path(file_okay=False, path_type=Path), multiple=True,
              help="Extra folders to find <variant>/manifest.json in [default: --ref and "
                   "the path each golden records].")
@click.option("--synth", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="synth_ckpt.py to write checkpoints with [default: found beside --ref "
                   "or the manifests].")
@click.option("--only", multiple=True, help="Run only these case names (repeatable).")
@click.option("--optimized", is_flag=True,
              help="Verify through EfficientDet.optimize() (verify parity --optimized).")
@click.option("--onnx", is_flag=True,
              help="Verify through the model exported to ONNX and run by onnxruntime "
                   "(verify parity --onnx): head taps and detections.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where checkpoints and reports go [default: a temporary folder].")
def main(ref: Path, manifests: tuple[Path, ...], synth: Path | None, only: tuple[str, ...],
         optimized: bool, onnx: bool, work_dir: Path | None) -> None:
    """Convert and verify every golden under --ref; one summary table; exit 1 on any failure."""
    cases = [c for c in find_cases(ref, list(manifests)) if not only or c.name in only]
    if not cases:
        raise click.ClickException(f"no golden*.json under {ref}/*/")
    if synth is None:
        places = [ref, *manifests, *(c.manifest.parent.parent for c in cases)]
        synth = next((p / "synth_ckpt.py" for p in places if (p / "synth_ckpt.py").is_file()), None)
        if synth is None:
            raise click.ClickException("synth_ckpt.py not found; pass --synth")
    with tempfile.TemporaryDirectory(prefix="verify-all-") as tmp:
        work = Path(work_dir or tmp)
        rows = []
        for case in cases:
            flags = ("--optimized",) * optimized + ("--onnx",) * onnx
            row = run_case(case, synth, work, flags)
            rows.append(row)
            click.echo(f"{'ok  ' if row['ok'] else 'FAIL'} {row['name']} "
                       f"({row['seconds']:.0f} s)", err=True)
    click.echo(f"{'variant':<40} {'taps':>7} {'worst rel':>10} {'time':>6}  detections")
    for row in rows:
        if "error" in row:
            click.echo(f"{row['name']:<40} {'-':>7} {'-':>10} {row['seconds']:>5.0f}s  "
                       f"ERROR {row['error']}")
            continue
        click.echo(f"{row['name']:<40} {row['taps']:>7} {row['worst']:>10.2e} "
                   f"{row['seconds']:>5.0f}s  {row['detections']}"
                   + ("" if row["ok"] else f"  FAIL at {row['first_divergence'] or 'detections'}"))
    skipped = max((r.get("unavailable", 0) for r in rows), default=0)
    if skipped:
        click.echo(f"taps: head taps only; up to {skipped} internal taps per case not "
                   f"available for this runtime (not compared)")
    failed = [r["name"] for r in rows if not r["ok"]]
    click.echo(f"{len(rows) - len(failed)}/{len(rows)} passed" +
               (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
