"""The command line as a user meets it: help texts, start-up imports, not-built commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import run_cli

HEAVY = ("torch", "torchvision", "tensorflow", "keras", "onnxruntime", "onnx", "tf2onnx", "numpy", "scipy")
COMMANDS = ["data", "mlp", "models", "train", "finetune", "export", "bench", "eval", "report", "predict",
            "bundle", "demo"]


@pytest.mark.parametrize("argv", [["--help"], ["data", "--help"], ["data", "split", "--help"]])
def test_help_does_not_import_heavy_libraries(argv):
    code = (
        "import sys, json\n"
        "from lungedge.cli import main\n"
        f"rc = main({argv!r})\n"
        f"print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rc, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rc == 0
    assert heavy == []


def test_root_help_lists_every_command(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for cmd in COMMANDS:
        assert f"  {cmd} " in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    code, out, _ = run_cli([cmd, "--help"], capsys)
    assert code == 0
    assert "Usage:" in out
    # a real description, not an empty help
    assert len(out.split("Usage:")[1].strip().splitlines()) >= 2


def test_backend_help_names_every_registered_backend():
    from lungedge.cli.runtime import BACKEND_NAMES
    from lungedge.runners.registry import BACKENDS

    assert sorted(BACKEND_NAMES.split(", ")) == sorted(BACKENDS)


def test_console_script_reports_errors_in_one_line():
    proc = subprocess.run([sys.executable, "-c", "from lungedge.cli import run; run()", "data", "inspect",
                           "/definitely/not/here"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: data folder not found: /definitely/not/here"
    assert "Traceback" not in proc.stderr


def test_unknown_command_is_a_usage_error(capsys):
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2
    assert "frobnicate" in err


@pytest.mark.parametrize("unbuffered", ["1", ""])
@pytest.mark.parametrize("argv", [["mlp", "demo"], ["mlp", "demo", "--json"]])
def test_unwritable_standard_output_is_named_and_a_closed_pipe_is_quiet(argv, unbuffered, tmp_path):
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}  # "": Python buffers stdout, flushed when the command ends
    command = [sys.executable, "-c", "from lungedge.cli import run; run()", *argv]
    with open("/dev/full", "w") as full:  # a full disk
        proc = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "error: cannot write to standard output: No space left on device\n"
    read, write = os.pipe()
    os.close(read)  # the reader has gone (| head -1 after its line)
    try:
        proc = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    finally:
        os.close(write)
    assert proc.returncode == 1 and proc.stderr == ""
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout and proc.stderr == ""
