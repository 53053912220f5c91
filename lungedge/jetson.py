"""What a Jetson's latency depends on, read where present: L4T / JetPack release, power mode,
and whether ``jetson_clocks`` pinned the clocks.

:func:`jetson_info` is called for every bench and eval result's provenance, so it is cheap
(a few small file reads; ``nvpmodel -q`` only on a Jetson, with a short timeout) and never
raises: anything it cannot read is ``None``. Off a Jetson it returns ``None``.

Sources, in order of preference:

* L4T release: ``/etc/nv_tegra_release`` (mounted into containers by ``--runtime nvidia``);
* JetPack: the ``nvidia-jetpack`` package in ``/var/lib/dpkg/status`` when installed, else
  the L4T -> JetPack table below (exact releases only), else ``"<major>.x"``;
* power mode: ``nvpmodel -q``; in a container without it, ``/var/lib/nvpmodel/status``
  plus ``/etc/nvpmodel.conf`` (bind-mount them read-only to get the mode recorded);
* jetson_clocks: sysfs (every online CPU's and the GPU's minimum frequency equals its
  maximum), else ``jetson_clocks --show`` when running as root.

The parsers are pure functions of the tools' text output, tested on sample outputs.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Optional

TIMEOUT_S = 3.0

# L4T release -> JetPack release (NVIDIA's JetPack archive); only releases known exactly.
L4T_TO_JETPACK = {
    "32.6.1": "4.6", "32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4",
    "32.7.5": "4.6.5",
    "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
    "38.2.0": "7.0",
}
L4T_MAJOR_TO_JETPACK = {"32": "4", "35": "5", "36": "6", "38": "7"}

ToolCall = Callable[[list], Optional[str]]  # runs a shell tool: argv -> its output, or None


# -- pure parsers ----------------------------------------------------------------------------------

def parse_nv_tegra_release(text: str) -> dict | None:
    """``# R36 (release), REVISION: 4.0, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ...``

    -> ``{"l4t": "36.4.0", "l4t_major": 36, "revision": "4.0", "gcid": ..., "board": ...,
    "eabi": ..., "date": ...}``; ``None`` when the text is not such a line.
    """
    for line in text.splitlines():
        m = re.match(r"\s*#?\s*R(\d+)\s*\(([^)]*)\)\s*,?\s*(.*)$", line)
        if not m:
            continue
        fields = {}
        for part in m.group(3).split(","):
            if ":" in part:
                key, value = part.split(":", 1)
                fields[key.strip().upper()] = value.strip()
        major = int(m.group(1))
        revision = fields.get("REVISION")
        nums = re.findall(r"\d+", revision or "")
        l4t = ".".join([str(major), *(nums + ["0", "0"])[:2]]) if nums else str(major)
        return {
            "l4t": l4t,
            "l4t_major": major,
            "release_kind": m.group(2).strip() or None,
            "revision": revision,
            "gcid": fields.get("GCID"),
            "board": fields.get("BOARD"),
            "eabi": fields.get("EABI"),
            "date": fields.get("DATE"),
        }
    return None


def jetpack_for_l4t(l4t: str | None) -> str | None:
    """'36.4.0' -> '6.1'; an L4T release not in the table -> '<JetPack major>.x'; unknown -> None."""
    if not l4t:
        return None
    if l4t in L4T_TO_JETPACK:
        return L4T_TO_JETPACK[l4t]
    major = L4T_MAJOR_TO_JETPACK.get(l4t.split(".")[0])
    return f"{major}.x" if major else None


def parse_nvpmodel(text: str) -> dict | None:
    """``nvpmodel -q`` output (``NV Power Mode: MAXN`` then the mode's id on its own line)
    -> ``{"power_mode": "MAXN", "power_mode_id": 0}``; ``None`` when no mode is named.
    Warning lines (``NVPM WARN: ...``) and fan-mode lines are ignored."""
    lines = [ln.strip() for ln in text.splitlines()]
    for i, line in enumerate(lines):
        m = re.match(r"NV Power Mode\s*:\s*(.+)$", line)
        if not m:
            continue
        mode_id = None
        for nxt in lines[i + 1:]:
            if re.fullmatch(r"\d+", nxt):
                mode_id = int(nxt)
                break
            if nxt and not nxt.startswith("NVPM"):
                break
        return {"power_mode": m.group(1).strip(), "power_mode_id": mode_id}
    return None


def parse_nvpmodel_status(status: str, conf: str | None = None) -> dict | None:
    """``/var/lib/nvpmodel/status`` (``pmode:0002 fmode:quiet``) and optionally
    ``/etc/nvpmodel.conf`` (``< POWER_MODEL ID=2 NAME=30W >``) -> the same dict as
    :func:`parse_nvpmodel`; the name is ``None`` without the conf file."""
    m = re.search(r"pmode\s*:\s*(\d+)", status)
    if not m:
        return None
    mode_id = int(m.group(1))
    name = None
    for cm in re.finditer(r"<\s*POWER_MODEL\s+ID\s*=\s*(\d+)\s+NAME\s*=\s*([^\s>]+)", conf or ""):
        if int(cm.group(1)) == mode_id:
            name = cm.group(2)
            break
    return {"power_mode": name, "power_mode_id": mode_id}


def parse_jetson_clocks(text: str) -> dict | None:
    """``jetson_clocks --show`` output -> ``{"jetson_clocks": bool, "machine", "soc", ...}``.

    The clocks count as pinned (jetson_clocks on) when every online CPU and the GPU run with
    MinFreq == MaxFreq (what ``jetson_clocks`` sets); ``None`` when the text holds no clocks.
    """
    info: dict = {}
    m = re.search(r"SOC family\s*:\s*(\S+)", text)
    if m:
        info["soc"] = m.group(1)
    m = re.search(r"Machine\s*:\s*(.+)", text)
    if m:
        info["machine"] = m.group(1).strip()
    m = re.search(r"NV Power Mode\s*:\s*(.+)", text)
    if m:
        info["power_mode"] = m.group(1).strip()
    pinned = []
    for line in text.splitlines():
        line = line.strip()
        # "cpu0: Online=1 Governor=..." on most boards, "cpu0:  Governor=..." (no Online field) on JetPack 6's
        # Orin Nano: a CPU line either way; only an explicitly offline CPU does not count
        cpu = re.match(r"cpu\d+\s*:", line)
        if cpu and re.search(r"\bOnline=0\b", line):
            continue
        if cpu or line.startswith("GPU "):
            lo = re.search(r"MinFreq=(\d+)", line)
            hi = re.search(r"MaxFreq=(\d+)", line)
            if lo and hi:
                pinned.append(lo.group(1) == hi.group(1))
        if line.startswith("GPU "):
            cur = re.search(r"CurrentFreq=(\d+)", line)
            if cur:
                info["gpu_freq_hz"] = int(cur.group(1))
        if line.startswith("EMC "):
            cur = re.search(r"CurrentFreq=(\d+)", line)
            if cur:
                info["emc_freq_hz"] = int(cur.group(1))
    if not pinned:
        return None
    info["jetson_clocks"] = all(pinned)
    return info


def parse_dpkg_version(status_text: str, package: str) -> str | None:
    """The installed version of ``package`` in a ``/var/lib/dpkg/status`` text."""
    for block in status_text.split("\n\n"):
        if re.search(rf"^Package:\s*{re.escape(package)}\s*$", block, re.M):
            if not re.search(r"^Status:.*\binstalled\b", block, re.M):
                continue
            m = re.search(r"^Version:\s*(\S+)", block, re.M)
            if m:
                return m.group(1)
    return None


# -- reading the machine -----------------------------------------------------------------------------

def _read(path: Path, limit: int = 1 << 16) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None


def run_tool(cmd: list) -> str | None:
    """stdout+stderr of a tool, or None when it is missing, fails to start or times out."""
    exe = shutil.which(cmd[0]) or next((p for p in (f"/usr/sbin/{cmd[0]}", f"/usr/bin/{cmd[0]}")
                                         if os.access(p, os.X_OK)), None)
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return (done.stdout or "") + (done.stderr or "")


def _clocks_from_sysfs(root: Path) -> bool | None:
    """True when every online CPU's and the GPU's min frequency equals its max (jetson_clocks on)."""
    pinned = []
    for cpu in sorted(root.glob("sys/devices/system/cpu/cpu[0-9]*/cpufreq")):
        lo, hi = _read(cpu / "scaling_min_freq"), _read(cpu / "scaling_max_freq")
        if lo and hi and lo.strip() and hi.strip():
            pinned.append(lo.strip() == hi.strip())
    gpu = []
    for dev in sorted(root.glob("sys/class/devfreq/*")):
        name = (_read(dev / "name") or "") + dev.name + (_read(dev / "device/of_node/name") or "")
        if not re.search(r"gpu|ga10b|gv11b|gp10b|gb10b|nvgpu", name, re.I):
            continue
        lo, hi = _read(dev / "min_freq"), _read(dev / "max_freq")
        if lo and hi and lo.strip() and hi.strip():
            gpu.append(lo.strip() == hi.strip())
    if not pinned or not gpu:
        return None
    return all(pinned) and all(gpu)


def _model_name(root: Path) -> str | None:
    for rel in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        text = _read(root / rel)
        if text:
            return text.replace("\x00", "").strip() or None
    return None


def _is_jetson(root: Path) -> bool:
    if (root / "etc/nv_tegra_release").is_file():
        return True
    for rel in ("proc/device-tree/compatible", "sys/firmware/devicetree/base/compatible"):
        if "nvidia,tegra" in (_read(root / rel) or ""):
            return True
    return False


def jetson_info(root: str | Path = "/", run: ToolCall | None = None) -> dict | None:
    """The Jetson settings that change latency, or ``None`` when this is not a Jetson.

    ``root`` reads another filesystem tree (tests, a mounted image). Tools (``nvpmodel``,
    ``jetson_clocks``) are run through ``run`` (default: :func:`run_tool`, only when ``root``
    is ``/``); a missing tool, a timeout or unreadable output leaves its fields ``None``.
    Never raises.
    """
    try:
        return _jetson_info(Path(root), run)
    except Exception:  # noqa: BLE001 - provenance must never break a benchmark
        return None


def _jetson_info(root: Path, run: ToolCall | None) -> dict | None:
    if not _is_jetson(root):
        return None
    tool = run if run is not None else (run_tool if root == Path("/") else (lambda cmd: None))

    def call(cmd: list) -> str | None:  # a failing tool leaves its fields None; the rest is still read
        try:
            out = tool(cmd)
        except Exception:  # noqa: BLE001
            return None
        return out if isinstance(out, str) else None

    info: dict = {
        "model": _model_name(root), "l4t": None, "l4t_board": None, "jetpack": None, "jetpack_source": None,
        "power_mode": None, "power_mode_id": None, "power_mode_source": None,
        "jetson_clocks": None, "jetson_clocks_source": None,
    }
    release = parse_nv_tegra_release(_read(root / "etc/nv_tegra_release") or "")
    if release:
        info["l4t"], info["l4t_board"] = release["l4t"], release["board"]
    dpkg = _read(root / "var/lib/dpkg/status", limit=1 << 24) or ""
    jetpack_pkg = parse_dpkg_version(dpkg, "nvidia-jetpack")
    if jetpack_pkg:
        info["jetpack"], info["jetpack_source"] = jetpack_pkg.split("+")[0].split("-")[0], "nvidia-jetpack package"
    elif jetpack_for_l4t(info["l4t"]):
        info["jetpack"], info["jetpack_source"] = jetpack_for_l4t(info["l4t"]), "L4T release"

    power = parse_nvpmodel(call(["nvpmodel", "-q"]) or "")
    if power:
        info.update(power, power_mode_source="nvpmodel -q")
    else:
        status = _read(root / "var/lib/nvpmodel/status")
        power = parse_nvpmodel_status(status or "", _read(root / "etc/nvpmodel.conf", limit=1 << 20))
        if power:
            info.update(power, power_mode_source="/var/lib/nvpmodel/status")

    clocks = _clocks_from_sysfs(root)
    if clocks is not None:
        info["jetson_clocks"], info["jetson_clocks_source"] = clocks, "sysfs"
    elif hasattr(os, "geteuid") and (os.geteuid() == 0 or tool is not run_tool):
        shown = parse_jetson_clocks(call(["jetson_clocks", "--show"]) or "")
        if shown:
            info["jetson_clocks"], info["jetson_clocks_source"] = shown["jetson_clocks"], "jetson_clocks --show"
            if info["power_mode"] is None and shown.get("power_mode"):
                info["power_mode"], info["power_mode_source"] = shown["power_mode"], "jetson_clocks --show"
            info["model"] = info["model"] or shown.get("machine")
    return copy.deepcopy(info)
