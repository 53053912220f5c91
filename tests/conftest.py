"""Shared fixtures. Torch is never imported here (and tensorflow never before torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def smooth_image(rng: np.random.Generator, size: int = 64, colour: bool = False):
    """A random smooth picture: distinct per draw, so unrelated images are not near-duplicates."""
    from PIL import Image

    channels = 3 if colour else 1
    coarse = rng.integers(0, 256, size=(6, 6, channels), dtype=np.uint8)
    img = Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse, mode="L" if channels == 1 else "RGB")
    return img.resize((size, size), Image.BICUBIC)


def ct_like_image(rng: np.random.Generator, size: int = 64):
    """A CT-like slice: the anatomy every slice shares (a wide body with two lungs, the spine below them and
    the table under the body: not the same turned by 90 or 180 degrees) plus a random smooth detail of its own,
    so that, as in IQ-OTH/NCCD, the shared anatomy is most of each image and unrelated slices are not
    near-duplicates."""
    from PIL import Image

    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
    lungs = ((np.abs(xx - 0.5) - 0.2) / 0.13) ** 2 + ((yy - 0.47) / 0.2) ** 2 < 1
    spine = ((xx - 0.5) / 0.07) ** 2 + ((yy - 0.72) / 0.06) ** 2 < 1
    table = (yy > 0.86) & (yy < 0.9) & (np.abs(xx - 0.5) < 0.45)
    coarse = rng.integers(0, 256, size=(6, 6), dtype=np.uint8)
    detail = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float64) - 128
    img = 20 + 110 * body - 80 * (lungs & body) + 100 * spine + 160 * table + 0.5 * detail * body
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def augmented_rotation(img, degrees: float):
    """Rotate, then crop the blank corners away and resize back, as LC25000's augmentation did."""
    import math

    from PIL import Image

    w, h = img.size
    rot = img.rotate(degrees, Image.BILINEAR)
    zoom = math.cos(math.radians(abs(degrees))) + math.sin(math.radians(abs(degrees)))
    cw, ch = w / zoom, h / zoom
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return rot.crop(tuple(round(v) for v in box)).resize((w, h), Image.BILINEAR)


def write_dataset(root: Path, classes, per_class: int = 6, copies: int = 1, size: int = 64, seed: int = 0,
                  colour: bool = False) -> Path:
    """One folder per class; each base image plus ``copies - 1`` rotated/flipped near-copies."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    transforms = [lambda im: im.transpose(Image.FLIP_LEFT_RIGHT), lambda im: im.rotate(90),
                  lambda im: augmented_rotation(im, 12)]
    for folder in classes:
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = smooth_image(rng, size, colour)
            base.save(d / f"img{i:03d}_0.png")
            for c in range(1, copies):
                transforms[(c - 1) % len(transforms)](base).save(d / f"img{i:03d}_{c}.png")
    return root


@pytest.fixture
def generic_dataset(tmp_path):
    return write_dataset(tmp_path / "data", ["cat_a", "cat_b", "cat_c"], per_class=8, copies=3)


def run_cli(args, capsys):
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    from lungedge.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, err: str, match: str | None = None, exit_code: int = 2) -> str:
    """Exit ``exit_code``, exactly one ``error:`` line (matching ``match``), no traceback; the line."""
    import re

    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert code == exit_code, err
    if match:
        assert re.search(match, lines[0]), lines[0]
    return lines[0]


def require_real(name: str) -> Path:
    path = REAL_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data set {path} is not present")
    return path


TRAIN_SIZES = {"googlenet": 64, "densenet121": 64, "inception_v3": 75, "resnet50": 64}
TRAIN_CLASSES = ["benign", "malignant", "normal"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """trained_run(name) -> run folder of a one-epoch training on tiny images, made once per session.

    ``trained_run.output(name)`` gives that training's (stdout, stderr); it ran with ``--json``.
    """
    import contextlib
    import io

    import torch  # noqa: F401  (torch before keras/tensorflow)

    base = tmp_path_factory.mktemp("trained")
    data = write_dataset(base / "data", TRAIN_CLASSES, per_class=12, size=64, colour=True)
    runs: dict[str, tuple[Path, str, str]] = {}

    def train(name: str) -> tuple[Path, str, str]:
        if name not in runs:
            from lungedge.cli import main

            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["train", name, "--data", str(data), "--epochs", "1", "--batch-size", "4",
                             "--image-size", str(TRAIN_SIZES[name]), "--weights", "none", "--out", str(base / "runs"),
                             "--run-name", "r", "--json"])
            assert code == 0, f"training {name} failed: {err.getvalue()[-2000:]}"
            runs[name] = (base / "runs" / name / "r", out.getvalue(), err.getvalue())
        return runs[name]

    def get(name: str) -> Path:
        return train(name)[0]

    get.output = lambda name: train(name)[1:]
    get.data = data
    get.runs = base / "runs"
    return get


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder nothing can be written into: a read-only one (0555), or, for root (whom permissions do not
    stop), a path under /sys, which refuses new entries even to root."""
    import os

    folder = tmp_path / "read-only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    folder.chmod(0o755)
    sys_dir = Path("/sys/lungedge-unwritable")
    try:
        sys_dir.mkdir()
    except OSError:
        return sys_dir
    sys_dir.rmdir()
    pytest.skip("no unwritable folder here (root, and /sys is writable)")


def small_file_limit(nbytes: int):
    """preexec_fn for subprocess: files larger than ``nbytes`` cannot be written (EFBIG, as a full disk would)."""
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


# -- tests write under tmp_path, never into the checkout ----------------------------------------------------------

CHECKOUT = Path(__file__).resolve().parents[1]
OUTPUT_FOLDERS = ("results", "runs", "engines", "calibration", "reports", "splits", "demo")


def _outputs() -> set[Path]:
    return {p for d in OUTPUT_FOLDERS if (CHECKOUT / d).is_dir() for p in (CHECKOUT / d).rglob("*")}


def pytest_sessionstart(session):
    session.config._outputs_before = _outputs()


def pytest_sessionfinish(session, exitstatus):
    """A command run by a test without ``--out`` writes into the checkout's default folders (results/,
    runs/, ...): the session fails and names the files."""
    new = sorted(_outputs() - getattr(session.config, "_outputs_before", set()))
    if new:
        print(f"\nerror: tests wrote into the checkout: {', '.join(str(p.relative_to(CHECKOUT)) for p in new[:5])}"
              + (f" and {len(new) - 5} more" if len(new) > 5 else ""))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def child_stopped_before(call: str, then: str, script: str, name_starts: str = ""):
    """A child process running ``script`` (Python source) in which ``os.<call>`` (``link`` or ``replace``: how a
    complete temporary takes its name), for a temporary whose file name starts with ``name_starts``, first:
    ``kill`` -- SIGKILLs the child (kill -9, the OOM killer); ``wait`` -- prints "stopped" and waits for a line
    on stdin before it goes on. The Popen, with stdin and stdout as text pipes."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, signal, sys
        real = os.{call}
        def stopped(tmp, path, *args, **kwargs):
            if os.path.basename(tmp).startswith({name_starts!r}):
                if {then!r} == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                print("stopped", flush=True)
                sys.stdin.readline()
            return real(tmp, path, *args, **kwargs)
        os.{call} = stopped
    """) + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
