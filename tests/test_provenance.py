"""Where a figure was measured: GPU facts from NVML, and a graceful None where there is no driver."""

from __future__ import annotations

import pytest

from lungedge import provenance


def _nvml_driver_present() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_no_nvidia_driver_gives_no_gpu_and_none():
    if _nvml_driver_present():
        pytest.skip("an NVIDIA driver is present here; the no-driver path needs a machine without one")
    assert provenance.gpus() == []
    facts = provenance.collect(threads=2)
    assert facts["gpu"] is None and facts["gpu_driver"] is None and facts["gpus"] == []
    assert "driver" not in provenance.machine_label(facts)


def test_an_nvidia_driver_gives_named_gpus():
    if not _nvml_driver_present():
        pytest.skip("no NVIDIA driver here (NVML cannot initialise)")
    found = provenance.gpus()
    assert found and all(g["name"] and g["driver"] and g["memory_mib"] > 0 for g in found)
    assert provenance.collect()["gpu"] == found[0]["name"]
