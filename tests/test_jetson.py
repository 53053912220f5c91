"""Jetson provenance: parsers on sample nvpmodel / nv_tegra_release / jetson_clocks outputs,
``jetson_info`` on a fake filesystem tree (never raising), and the README's Jetson walkthrough."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest

from lungedge import jetson
from lungedge.jetson import (jetpack_for_l4t, jetson_info, parse_dpkg_version, parse_jetson_clocks,
                             parse_nv_tegra_release, parse_nvpmodel, parse_nvpmodel_status)

ROOT = Path(__file__).resolve().parents[1]

TEGRA_R36 = ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, "
             "DATE: Fri Sep 13 04:36:44 UTC 2024\n"
             "# KERNEL_VARIANT: oot\n"
             "TARGET_USERSPACE_LIB_DIR=nvidia\n"
             "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n")
TEGRA_R35 = ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
             "DATE: Tue Aug  1 19:57:35 UTC 2023\n")
TEGRA_R36_43 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n"

NVPMODEL_ORIN = "NV Fan Mode:quiet\nNV Power Mode: MAXN\n0\n"
NVPMODEL_NANO_WARN = ("NVPM WARN: Golden image context is already created\n"
                      "NVPM WARN: Reboot required for changing to this power mode: 0\n"
                      "NV Power Mode: 15W\n0\n")
NVPMODEL_SUPER = "NV Power Mode: MAXN_SUPER\n2\n"

NVPMODEL_CONF = """< PARAM TYPE=FILE NAME=CPU_ONLINE >
CORE_0 /sys/devices/system/cpu/cpu0/online
< POWER_MODEL ID=0 NAME=MAXN >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=1 NAME=15W >
CPU_ONLINE CORE_0 1
< POWER_MODEL ID=2 NAME=30W >
CPU_ONLINE CORE_0 1
< PM_CONFIG DEFAULT=2 >
"""

CLOCKS_ON = """SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit
Online CPUs: 0-11
cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
cpu1: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
cpu11: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600 IdleStates: WFI=0 c7=0
GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
DLA0_CORE:   Online=1 MinFreq=0 MaxFreq=1600000000 CurrentFreq=1600000000
DLA0_FALCON: Online=1 MinFreq=0 MaxFreq=844800000 CurrentFreq=844800000
PVA0_VPS0: Online=1 MinFreq=0 MaxFreq=1152000000 CurrentFreq=1152000000
FAN Dynamic Speed control=active hwmon4_pwm=255
NV Power Mode: MAXN
"""
CLOCKS_OFF = CLOCKS_ON.replace("cpu1: Online=1 Governor=schedutil MinFreq=2201600",
                               "cpu1: Online=1 Governor=schedutil MinFreq=729600") \
                      .replace("GPU MinFreq=1300500000", "GPU MinFreq=306000000") \
                      .replace("CurrentFreq=1300500000", "CurrentFreq=306000000")

# `jetson_clocks --show` on an Orin Nano Super (JetPack 6, L4T r36, clocks not pinned): the CPU lines carry no
# "Online=" field (a real capture, trimmed to its clock lines)
CLOCKS_ORIN_NANO_JP6 = """SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super
Online CPUs: 0-5, Offline CPUs:
cpu0:  Governor=schedutil MinFreq=729600 MaxFreq=1344000 CurrentFreq=960000 IdleStates: WFI=1 c7=1
cpu1:  Governor=schedutil MinFreq=729600 MaxFreq=1344000 CurrentFreq=960000 IdleStates: WFI=1 c7=1
cpu2:  Governor=schedutil MinFreq=729600 MaxFreq=1344000 CurrentFreq=1344000 IdleStates: WFI=1 c7=1
cpu3:  Governor=schedutil MinFreq=729600 MaxFreq=1344000 CurrentFreq=1344000 IdleStates: WFI=1 c7=1
cpu4:  Governor=schedutil MinFreq=729600 MaxFreq=1344000 CurrentFreq=1344000 IdleStates: WFI=1 c7=1
cpu5:  Governor=schedutil MinFreq=729600 MaxFreq=1344000 CurrentFreq=1267200 IdleStates: WFI=1 c7=1
GPU MinFreq=306000000 MaxFreq=918000000 CurrentFreq=306000000
Active GPU TPCs: 4
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=665600000
FAN Dynamic Speed Control=nvfancontrol hwmon0_pwm1=60
NV Power Mode: 25W
"""

DPKG_STATUS = """Package: nvidia-l4t-core
Status: install ok installed
Version: 36.4.0-20240912212859

Package: nvidia-jetpack
Status: install ok installed
Architecture: arm64
Version: 6.1+b123
"""


# -- parsers -----------------------------------------------------------------------------------------

def test_parse_nv_tegra_release():
    r = parse_nv_tegra_release(TEGRA_R36)
    assert r["l4t"] == "36.4.0" and r["l4t_major"] == 36 and r["revision"] == "4.0"
    assert r["board"] == "generic" and r["eabi"] == "aarch64" and r["gcid"] == "37537400"
    assert r["date"] == "Fri Sep 13 04:36:44 UTC 2024"
    assert parse_nv_tegra_release(TEGRA_R35)["l4t"] == "35.4.1"
    assert parse_nv_tegra_release(TEGRA_R36_43)["l4t"] == "36.4.3"
    assert parse_nv_tegra_release("") is None
    assert parse_nv_tegra_release("garbage\n\x00\x01") is None


def test_jetpack_from_l4t():
    assert jetpack_for_l4t("36.4.0") == "6.1"
    assert jetpack_for_l4t("36.4.3") == "6.2"
    assert jetpack_for_l4t("35.4.1") == "5.1.2"
    assert jetpack_for_l4t("36.9.9") == "6.x"  # a release newer than the table
    assert jetpack_for_l4t("99.1.0") is None and jetpack_for_l4t(None) is None


def test_parse_nvpmodel():
    assert parse_nvpmodel(NVPMODEL_ORIN) == {"power_mode": "MAXN", "power_mode_id": 0}
    assert parse_nvpmodel(NVPMODEL_NANO_WARN) == {"power_mode": "15W", "power_mode_id": 0}
    assert parse_nvpmodel(NVPMODEL_SUPER) == {"power_mode": "MAXN_SUPER", "power_mode_id": 2}
    assert parse_nvpmodel("NV Power Mode: 30W\n") == {"power_mode": "30W", "power_mode_id": None}
    assert parse_nvpmodel("nvpmodel: command not found\n") is None
    assert parse_nvpmodel("") is None


def test_parse_nvpmodel_status_and_conf():
    assert parse_nvpmodel_status("pmode:0002 fmode:quiet\n", NVPMODEL_CONF) == {"power_mode": "30W",
                                                                               "power_mode_id": 2}
    assert parse_nvpmodel_status("pmode:0000\n") == {"power_mode": None, "power_mode_id": 0}
    assert parse_nvpmodel_status("") is None


def test_parse_jetson_clocks():
    on = parse_jetson_clocks(CLOCKS_ON)
    assert on["jetson_clocks"] is True
    assert on["machine"] == "NVIDIA Jetson AGX Orin Developer Kit" and on["soc"] == "tegra234"
    assert on["power_mode"] == "MAXN" and on["gpu_freq_hz"] == 1300500000 and on["emc_freq_hz"] == 3199000000
    off = parse_jetson_clocks(CLOCKS_OFF)
    assert off["jetson_clocks"] is False and off["gpu_freq_hz"] == 306000000
    offline = CLOCKS_OFF.replace("cpu1: Online=1", "cpu1: Online=0").replace("GPU MinFreq=306000000",
                                                                             "GPU MinFreq=1300500000")
    assert parse_jetson_clocks(offline)["jetson_clocks"] is True  # offline CPUs do not count


def test_parse_jetson_clocks_counts_cpu_lines_without_an_online_field():
    """JetPack 6 prints "cpu0:  Governor=..." on an Orin Nano: those CPUs still count, so a pinned GPU alone
    (CPUs still scaling) is not "jetson_clocks on"."""
    assert parse_jetson_clocks(CLOCKS_ORIN_NANO_JP6)["jetson_clocks"] is False
    gpu_only = CLOCKS_ORIN_NANO_JP6.replace("GPU MinFreq=306000000", "GPU MinFreq=918000000")
    assert parse_jetson_clocks(gpu_only)["jetson_clocks"] is False
    pinned = gpu_only.replace("MinFreq=729600", "MinFreq=1344000")
    on = parse_jetson_clocks(pinned)
    assert on["jetson_clocks"] is True and on["power_mode"] == "25W" and on["gpu_freq_hz"] == 306000000
    assert parse_jetson_clocks("Permission denied\n") is None


def test_parse_dpkg_version():
    assert parse_dpkg_version(DPKG_STATUS, "nvidia-jetpack") == "6.1+b123"
    assert parse_dpkg_version(DPKG_STATUS, "nvidia-l4t-core") == "36.4.0-20240912212859"
    assert parse_dpkg_version(DPKG_STATUS, "tensorrt") is None
    removed = DPKG_STATUS.replace("Status: install ok installed\nArchitecture", "Status: deinstall ok config-files\nArchitecture")
    assert parse_dpkg_version(removed, "nvidia-jetpack") is None


# -- jetson_info on a fake tree ----------------------------------------------------------------------

def fake_jetson(root: Path, *, clocks_on: bool = True, dpkg: bool = False, status: bool = True) -> Path:
    def put(rel, text):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    put("etc/nv_tegra_release", TEGRA_R36)
    put("proc/device-tree/model", "NVIDIA Jetson AGX Orin Developer Kit\x00")
    for i in range(4):
        cpu = f"sys/devices/system/cpu/cpu{i}/cpufreq"
        put(f"{cpu}/scaling_max_freq", "2201600\n")
        put(f"{cpu}/scaling_min_freq", "2201600\n" if clocks_on else "729600\n")
    gpu = "sys/class/devfreq/17000000.gpu"
    put(f"{gpu}/max_freq", "1300500000\n")
    put(f"{gpu}/min_freq", "1300500000\n" if clocks_on else "306000000\n")
    put("sys/class/devfreq/bpmp-emc/max_freq", "3199000000\n")  # not the GPU: ignored
    put("sys/class/devfreq/bpmp-emc/min_freq", "204000000\n")
    if status:
        put("var/lib/nvpmodel/status", "pmode:0002 fmode:quiet\n")
        put("etc/nvpmodel.conf", NVPMODEL_CONF)
    if dpkg:
        put("var/lib/dpkg/status", DPKG_STATUS)
    return root


def test_not_a_jetson(tmp_path):
    assert jetson_info(tmp_path) is None
    started = time.perf_counter()
    assert jetson_info() is None or isinstance(jetson_info(), dict)  # this machine: cheap either way
    assert time.perf_counter() - started < 10


def test_jetson_info_from_files(tmp_path):
    info = jetson_info(fake_jetson(tmp_path))
    assert info == {
        "model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t": "36.4.0", "l4t_board": "generic",
        "jetpack": "6.1", "jetpack_source": "L4T release",
        "power_mode": "30W", "power_mode_id": 2, "power_mode_source": "/var/lib/nvpmodel/status",
        "jetson_clocks": True, "jetson_clocks_source": "sysfs",
    }
    info = jetson_info(fake_jetson(tmp_path / "b", clocks_on=False, dpkg=True))
    assert info["jetson_clocks"] is False and info["jetpack"] == "6.1"
    assert info["jetpack_source"] == "nvidia-jetpack package"


def test_jetson_info_prefers_nvpmodel_and_survives_broken_tools(tmp_path):
    root = fake_jetson(tmp_path, status=False)
    calls = []

    def run(cmd):
        calls.append(cmd[0])
        return NVPMODEL_ORIN if cmd[0] == "nvpmodel" else None

    info = jetson_info(root, run=run)
    assert info["power_mode"] == "MAXN" and info["power_mode_id"] == 0 and info["power_mode_source"] == "nvpmodel -q"

    def broken(cmd):
        raise TimeoutError("nvpmodel hung")

    info = jetson_info(root, run=broken)
    assert info["power_mode"] is None and info["l4t"] == "36.4.0"  # the rest is still read

    # no sysfs clocks: jetson_clocks --show through the runner
    for p in (root / "sys").rglob("min_freq"):
        p.unlink()
    info = jetson_info(root, run=lambda cmd: CLOCKS_OFF if cmd[0] == "jetson_clocks" else "")
    assert info["jetson_clocks"] is False and info["jetson_clocks_source"] == "jetson_clocks --show"
    assert info["power_mode"] == "MAXN"  # jetson_clocks --show also names the mode


def test_jetson_info_never_raises(tmp_path, monkeypatch):
    root = fake_jetson(tmp_path)
    (root / "etc/nv_tegra_release").write_bytes(b"\xff\xfe\x00garbage")
    info = jetson_info(root)
    assert info["l4t"] is None and info["jetpack"] is None and info["model"]
    monkeypatch.setattr(jetson, "_is_jetson", lambda root: 1 / 0)
    assert jetson_info(root) is None


def test_run_tool_missing_or_slow(monkeypatch, tmp_path):
    assert jetson.run_tool(["surely-not-a-tool-lungedge"]) is None
    slow = tmp_path / "slowtool"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    monkeypatch.setattr(jetson, "TIMEOUT_S", 0.2)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    started = time.perf_counter()
    assert jetson.run_tool(["slowtool"]) is None
    assert time.perf_counter() - started < 3


# -- the README's walkthrough: every lungedge command exists -----------------------------------------

SECTION = "## Deploy to a Jetson"


def walkthrough_commands(markdown: str) -> list[list[str]] | None:
    """Every ``lungedge ...`` line inside the code blocks of the README's Jetson section (None if absent)."""
    lines = markdown.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == SECTION)
    except StopIteration:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    commands, in_code, pending = [], False, ""
    for line in lines[start + 1:end]:
        if line.strip().startswith("```"):
            in_code, pending = not in_code, ""
            continue
        if not in_code:
            continue
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        if line.strip().startswith("lungedge "):
            commands.append(shlex.split(line.strip(), comments=True))
    return commands


def command_path(words: list[str]) -> list[str]:
    """The subcommand words of a ``lungedge`` line, up to its first option or argument."""
    import typer

    from lungedge.cli import app

    node = typer.main.get_command(app)
    path = []
    for word in words[1:]:
        sub = getattr(node, "commands", {}).get(word)
        if sub is None:
            break
        path.append(word)
        node = sub
    return path


def unknown_options(words: list[str]) -> list[str]:
    """Options of a ``lungedge`` line that its command does not have (``bundle MODEL`` is ``bundle create``)."""
    import typer

    from lungedge.cli import app

    node = typer.main.get_command(app)
    for word in command_path(words):
        node = node.commands[word]
    if getattr(node, "commands", None) and "create" in node.commands:
        node = node.commands["create"]
    if getattr(node, "commands", None) or node.context_settings.get("ignore_unknown_options"):
        return []  # a group, or a command still planned: nothing to check against
    known = {o for p in node.params for o in (*p.opts, *p.secondary_opts)}
    return [w.split("=")[0] for w in words if w.startswith("-") and w.split("=")[0] not in known]


def test_walkthrough_parser():
    md = ("# x\n## Deploy to a Jetson\ntext\n```bash\nlungedge bundle verify f.tar.gz  # check\n"
          "docker run x\nlungedge engine build \\\n  a.onnx --max-batch 8\n```\n## Next\n```\nlungedge nope\n```\n")
    cmds = walkthrough_commands(md)
    assert cmds == [["lungedge", "bundle", "verify", "f.tar.gz"],
                    ["lungedge", "engine", "build", "a.onnx", "--max-batch", "8"]]
    assert [command_path(c) for c in cmds] == [["bundle", "verify"], ["engine", "build"]]
    assert walkthrough_commands("# no such section\n") is None
    assert unknown_options(["lungedge", "bundle", "m", "--out", "x.tar.gz", "--precision=fp16"]) == []
    assert unknown_options(["lungedge", "engine", "build", "a.onnx", "--max-batch", "8", "--fp17"]) == ["--fp17"]


def test_readme_walkthrough_commands_exist(capsys):
    readme = ROOT / "README.md"
    commands = walkthrough_commands(readme.read_text(encoding="utf-8")) if readme.is_file() else None
    if commands is None:
        pytest.skip(f"README.md has no '{SECTION}' section yet")
    assert commands, "the Jetson section has no lungedge commands"
    from lungedge.cli import main

    checked = set()
    for words in commands:
        path = command_path(words)
        assert path, f"not a lungedge command: {' '.join(words)}"
        assert not unknown_options(words), f"{' '.join(words)}: unknown options {unknown_options(words)}"
        if tuple(path) in checked:
            continue
        checked.add(tuple(path))
        code = main([*path, "--help"])
        out = capsys.readouterr().out
        assert code == 0 and out.startswith("Usage:"), f"lungedge {' '.join(path)} --help failed"
        assert re.search(r"\S", out)
