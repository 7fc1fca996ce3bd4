"""Conventions shared by the command lines: fast --help (no torch/TF at import), --version on
every command, --variant short names, the shared --device option, TF start-up logs silenced."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from converter.cli import main as convert_main
from detect.cli import main as detect_main
from model._version import __version__
from verify.cli import main as verify_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = REPO
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_command_modules_import_without_torch_or_tensorflow():
    result = _python("import sys, converter.cli, verify.cli, detect.cli, train.cli, model\n"
                     "heavy = sorted(m for m in ('torch', 'tensorflow', 'matplotlib') "
                     "if m in sys.modules)\n"
                     "print(heavy)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command, args", [
    (convert_main, []), (verify_main, []), (verify_main, ["parity"]), (verify_main, ["coco"]),
    (detect_main, []),
])
def test_every_command_has_version_and_help(command, args):
    runner = CliRunner()
    version = runner.invoke(command, [*args, "--version"])
    assert version.exit_code == 0 and __version__ in version.output
    helped = runner.invoke(command, [*args, "-h"])
    assert helped.exit_code == 0 and "Usage:" in helped.output


def test_subcommand_list_has_full_help_lines():
    listing = CliRunner().invoke(verify_main, ["--help"]).output
    assert "Compare converted weights with TF, tap by tap and on detections." in listing
    assert "COCO bbox mAP of converted weights beside automl's published AP." in listing


def test_variant_short_name_is_accepted(tmp_path):
    result = CliRunner().invoke(convert_main, ["--ckpt", str(tmp_path / "none"), "--out",
                                               str(tmp_path / "x.pth"), "--variant", "d0"])
    assert result.exit_code == 3, result.output          # got past --variant to the input
    result = CliRunner().invoke(convert_main, ["--ckpt", str(tmp_path / "none"), "--out",
                                               str(tmp_path / "x.pth"), "--variant", "d9"])
    assert result.exit_code == 2 and "unknown variant 'd9'" in result.output


@pytest.mark.parametrize("device, ok", [("auto", True), ("cpu", True), ("cuda:1", True),
                                        ("tpu", False), ("cpu:0", False)])
def test_device_option_is_shared(device, ok, tmp_path):
    for command, args in ((verify_main, ["parity", "--weights", str(tmp_path / "w.pth"),
                                         "--golden", str(tmp_path)]),
                          (detect_main, ["--weights", str(tmp_path / "w.pth"), str(tmp_path)])):
        result = CliRunner().invoke(command, [*args, "--device", device])
        assert (result.exit_code != 2) == ok, result.output


@pytest.mark.slow
def test_tensorflow_import_prints_nothing():
    result = _python("from converter.tf_quiet import import_tensorflow_quietly\n"
                     "tf = import_tensorflow_quietly()\n"
                     "tf.constant(1.0) + 1.0\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
