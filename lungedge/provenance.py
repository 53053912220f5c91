"""Where and how a result was measured: host, CPU, GPU and driver, library versions, threads, date.

Cheap and never failing: anything that cannot be read (no NVIDIA driver, no /proc) is ``None``.
Library versions come from the installed package metadata, so nothing heavy is imported.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from functools import lru_cache

LIBRARIES = ("lungedge", "numpy", "torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino",
             "nncf", "tensorflow", "tensorflow-cpu", "keras", "tensorrt", "scikit-learn")


def _safe(fn, default=None):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - provenance must never crash a measurement
        return default


def cpu_model() -> str | None:
    def from_proc():
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
        return None

    return _safe(from_proc) or _safe(platform.processor) or None


def physical_cores() -> int | None:
    def count():
        seen = set()
        phys = core = None
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not line.strip():
                    if core is not None:
                        seen.add((phys, core))
                    phys = core = None
        return len(seen) or None

    return _safe(count)


def gpus() -> list[dict]:
    """[{name, driver, memory_mib}] per NVIDIA GPU, from NVML (nvidia-ml-py); empty where there is none."""
    try:
        import pynvml
    except ImportError:  # a bare machine (no nvidia-ml-py): ask nvidia-smi
        return _safe(_gpus_from_smi, [])
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no NVIDIA driver (or no NVML, as on a Jetson)
        return []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        out = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            out.append({"name": _text(pynvml.nvmlDeviceGetName(handle)), "driver": driver,
                        "memory_mib": _safe(lambda h=handle: int(pynvml.nvmlDeviceGetMemoryInfo(h).total) // 2**20)})
        return out
    except pynvml.NVMLError:
        return []
    finally:
        _safe(pynvml.nvmlShutdown)


def _gpus_from_smi() -> list[dict]:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        return []
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
    return [{"name": r[0], "driver": r[1], "memory_mib": int(float(r[2]))} for r in rows if len(r) == 3]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def library_versions() -> dict:
    from importlib import metadata

    out = {}
    for name in LIBRARIES:
        v = _safe(lambda n=name: metadata.version(n))
        if v:
            out[name] = v
    return out


def jetson() -> dict | None:
    try:
        from .jetson import jetson_info  # provided on Jetson set-ups by another module
    except ImportError:
        return None
    except Exception:  # noqa: BLE001 - a broken helper must not break a measurement
        return None
    return _safe(jetson_info)


@lru_cache(maxsize=1)
def _static() -> dict:
    g = gpus()
    return {
        "host": _safe(platform.node),
        "os": _safe(platform.platform),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": physical_cores(),
        "gpu": g[0]["name"] if g else None,
        "gpu_driver": g[0]["driver"] if g else None,
        "gpus": g,
        "libraries": library_versions(),
        "jetson": jetson(),
    }


def collect(threads=None, **extra) -> dict:
    """Provenance of one measurement (static machine facts are read once per process)."""
    d = dict(_static())
    d["threads"] = threads
    d["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    d.update(extra)
    return d


def machine_label(p: dict) -> str:
    """A short, stable name for the machine a row came from: host, CPU/cores, GPU."""
    if not p:
        return "unknown machine"
    parts = [str(p.get("host") or "unknown-host")]
    cpu = p.get("cpu") or "unknown CPU"
    parts.append(f"{cpu}, {p.get('cpu_logical_cores') or '?'} cores")
    if p.get("jetson"):
        j = p["jetson"]
        parts.append(str(j.get("model") or j.get("name") or "Jetson") if isinstance(j, dict) else "Jetson")
    elif p.get("gpu"):
        parts.append(f"{p['gpu']} (driver {p.get('gpu_driver')})")
    return " | ".join(parts)


def slug_host() -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", str(_static().get("host") or "host")).strip("-").lower() or "host"
