"""One archive with everything a Jetson needs for a model, and nothing else.

``<name>.tar.gz`` holds a single top folder ``<name>/`` with

* ``engines/<model>/<model>.<precision>.onnx`` — the exported ONNX files (each carries its own
  metadata: classes, preprocessing, precision, source checkpoint hash);
* ``engines/<model>/<model>.export.json`` — the export summary (parity, accuracy at export);
* ``calibration/<key>/manifest.json`` — the INT8 calibration set's manifest (when INT8 is in);
* ``README.md`` — what the bundle is and the commands to run on the device;
* ``manifest.json`` — SHA-256 and size of every other member, and each ONNX's metadata;
* ``SHA256SUMS`` — the same checksums (plus ``manifest.json``'s) for ``sha256sum -c``.

:func:`verify` reads the whole archive and refuses a truncated or corrupt one, a member that
is missing, extra, changed or unsafe (absolute path, ``..``, link, device), with one line.
The layout mirrors the workstation's, so the unpacked top folder is a working directory on
the device: ``lungedge engine build``, ``bench`` and ``eval`` find everything at their defaults.
The archive is deterministic: the same inputs give the same bytes. Checksums catch accidents
and tampering of single files, not a deliberate re-signing of the manifest (no signature).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from . import __version__, onnx_meta
from .errors import LungedgeError, check_choice
from .io import FolderLock, check_replaceable, clean_stale, dumps_json, sha256_file, write_error

FORMAT = "lungedge-bundle/1"
# what --precision names: the ONNX variants (onnx_meta.VARIANTS), int8 = S8S8 for TensorRT, int8-cpu = U8S8
PRECISIONS = tuple(onnx_meta.VARIANTS)
DEFAULT_PRECISIONS = tuple(v for v, (_, target) in onnx_meta.VARIANTS.items() if target in (None, "trt"))
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
_CHUNK = 1 << 20


# -- creating ----------------------------------------------------------------------------------------

def parse_precisions(text: str | None) -> list[str] | None:
    """'fp16,int8' -> ['fp16', 'int8']; None -> None (every exported precision TensorRT can use)."""
    if text is None:
        return None
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    if not names:
        raise LungedgeError("--precision is empty (choose from " + ", ".join(PRECISIONS) + ")")
    for name in names:
        check_choice(name, PRECISIONS, "precision")
    return list(dict.fromkeys(names))


def _export_summary(model: str, engines: Path) -> tuple[Path, dict]:
    path = engines / model / f"{model}.export.json"
    if not path.is_file():
        raise LungedgeError(f"no export of {model} under {engines / model} ({path.name} is missing); "
                            f"run 'lungedge export {model} --fp16 --int8' first")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LungedgeError(f"{path} is corrupt; run 'lungedge export {model}' again") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("files"), dict):
        raise LungedgeError(f"{path} is not a lungedge export summary")
    return path, summary


def _onnx_file(model: str, precision: str, summary: dict, engines: Path) -> Path:
    """The ONNX of ``precision``: where the summary says, else beside the summary."""
    candidates = [engines / model / f"{model}.{precision}.onnx"]
    if summary["files"].get(precision):
        candidates.insert(0, Path(summary["files"][precision]))
    for path in candidates:
        if path.is_file():
            return path
    flag = onnx_meta.variant_facts(precision)[0]
    raise LungedgeError(f"{model} has no {precision} ONNX under {engines / model}; export it with "
                        f"'lungedge export {model} --{flag}'" if flag != "fp32" else
                        f"{model} has no fp32 ONNX under {engines / model}; run 'lungedge export {model}'")


def _calibration_manifest(summary: dict, calibration: Path) -> tuple[str, Path]:
    calib = summary.get("calibration") or {}
    key = calib.get("key")
    candidates = []
    if key:
        candidates.append(calibration / key / "manifest.json")
    if calib.get("folder"):
        candidates.append(Path(calib["folder"]) / "manifest.json")
    for path in candidates:
        if path.is_file():
            return key or path.parent.name, path
    where = ", ".join(str(p) for p in candidates) or "the export summary names none"
    raise LungedgeError(f"the INT8 calibration manifest is missing ({where}); pass --calibration DIR "
                        f"or export with --int8 again")


def _check_one_source(describe: dict, summary: dict) -> None:
    """Refuse a set mixed from two exports: every ONNX file must come from the export summary's
    checkpoint (source SHA-256) and share one input size (issue #13)."""
    facts = {arc: (d.get("source_sha256"), d["preprocessing"].get("size")) for arc, d in describe.items()}
    want = summary.get("checkpoint_sha256")
    for arc, (sha, size) in facts.items():
        first_arc, (first_sha, first_size) = next(iter(facts.items()))
        if (want and sha != want) or sha != first_sha or size != first_size:
            raise LungedgeError(f"{arc} is not from the same export as {first_arc} (source checkpoint "
                                f"{str(sha)[:12]} at {size} px vs {str(first_sha)[:12]} at {first_size} px"
                                + (f", export summary {want[:12]}" if want else "") + "); re-run 'lungedge export'")


def _describe_onnx(path: Path, model: str, variant: str) -> dict:
    meta = onnx_meta.read(path)
    if meta.get("architecture") != model:
        raise LungedgeError(f"{path} is a {meta.get('architecture')} model, not {model}")
    want = onnx_meta.variant_facts(variant)[0]
    if meta.get("precision") != want:
        raise LungedgeError(f"{path} says precision {meta.get('precision')}, expected {want}")
    if onnx_meta.variant_of_meta(meta) != variant:
        raise LungedgeError(f"{path} is the {onnx_meta.variant_of_meta(meta)} variant, expected {variant}")
    pre = meta["preprocessing"]
    return {
        "architecture": meta["architecture"],
        "framework": meta.get("framework"),
        "precision": meta["precision"],
        "int8_target": (meta.get("extra") or {}).get("int8_target"),
        "classes": meta["classes"],
        "input_shape": meta.get("input_shape"),
        "preprocessing": pre.to_dict() if hasattr(pre, "to_dict") else pre,
        "source_sha256": meta.get("source_sha256"),
    }


def readme_text(name: str, model: str, files: dict[str, str], describe: dict) -> str:
    first = next(iter(describe.values()))
    lines = [
        f"# {name}",
        "",
        f"A lungedge deployment bundle of `{model}` ({first['framework']}), classes in output order: "
        f"{', '.join(first['classes'])}; input {first['input_shape']}.",
        "Each ONNX file carries its own metadata (classes, preprocessing, precision, source checkpoint",
        "SHA-256); `manifest.json` lists every file's SHA-256 and size.",
        "",
        "| precision | file |",
        "|---|---|",
        *(f"| {p} | `{f}` |" for p, f in files.items()),
        "",
        "On the Jetson, inside the lungedge container (`docker run --runtime nvidia ...`):",
        "",
        "```bash",
        f"lungedge bundle verify {name}.tar.gz",
        f"lungedge bundle extract {name}.tar.gz --to .",
        f"cd {name}",
        *(f"lungedge engine build {f} --max-batch 8" for p, f in files.items() if p in ("fp16", "int8", "fp32")),
        f"lungedge bench {model} --device cuda --backend tensorrt,onnxruntime --batch-sizes 1,8 --out results/",
        f"lungedge eval {model} --device cuda --data DATA --split SPLIT.json --out results/",
        "```",
        "",
        "Then copy `results/` back to the workstation and run `lungedge report --results results/`.",
        "",
        f"Without lungedge: `cd {name} && sha256sum -c SHA256SUMS`.",
        "",
    ]
    return "\n".join(lines)


def _tar_add(tar: tarfile.TarFile, arcname: str, data: bytes | None, src: Path | None, mtime: int) -> None:
    info = tarfile.TarInfo(arcname)
    info.size = len(data) if data is not None else src.stat().st_size
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = mtime, 0o644, 0, 0, "", ""
    if data is not None:
        tar.addfile(info, io.BytesIO(data))
    else:
        with open(src, "rb") as fh:
            tar.addfile(info, fh)


def _dir_entry(name: str, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = \
        tarfile.DIRTYPE, 0o755, mtime, 0, 0, "", ""
    return info


def bundle_name(out: Path) -> str:
    """'dist/googlenet-jetson.tar.gz' -> 'googlenet-jetson' (the archive's top folder)."""
    name = out.name
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        raise LungedgeError(f"--out must end with .tar.gz or .tgz, got {out}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise LungedgeError(f"bundle name {name!r} (from --out) may hold only letters, digits, '.', '_' and '-'")
    return name


def _exported_precisions(model: str, summary: dict, engines: Path) -> list[str]:
    """Every exported variant TensorRT on the device can use."""
    found = [p for p in DEFAULT_PRECISIONS
             if summary["files"].get(p) or (engines / model / f"{model}.{p}.onnx").is_file()]
    if not found:
        raise LungedgeError(f"no ONNX files of {model} under {engines / model}; run 'lungedge export {model}'")
    return found


def _gate(model: str, precision: str, src: Path, results, allow_failed_gate: bool,
          exported: dict | None = None) -> str | None:
    """The release gate (issue #16) of a reduced-precision ONNX, as 'lungedge eval' recorded it in ``results``,
    else as 'lungedge export' judged it (``exported``: the export summary's gate of this precision): a failed
    gate refuses the precision unless ``allow_failed_gate``."""
    from .stats import gate_line, gate_results

    if results is None or onnx_meta.variant_facts(precision)[0] == "fp32":
        return None
    found = gate_results(results, sha256_file(src))
    if found is None and exported:
        found = {"pass": bool(exported["pass"]), "line": gate_line(exported), "file": "the export summary"}
    if found is None:
        return "not evaluated"
    if not found["pass"] and not allow_failed_gate:
        raise LungedgeError(f"{model} {precision} failed the release gate against FP32 ({found['line']}; "
                            f"{found['file']}); re-export or pass --allow-failed-gate")
    return "pass" if found["pass"] else "FAIL (allowed by --allow-failed-gate)"


def _members(name: str, model: str, precisions: list[str], engines: Path, calibration: Path, results=None,
             allow_failed_gate: bool = False) -> tuple[dict, dict]:
    """(arcname under the top folder -> source file or bytes, the manifest's facts) of a bundle."""
    summary_path, summary = _export_summary(model, engines)
    precisions = precisions or _exported_precisions(model, summary, engines)
    members: dict[str, Path | bytes] = {}
    describe, files, gates = {}, {}, {}
    for precision in precisions:
        src = _onnx_file(model, precision, summary, engines)
        if (verdict := _gate(model, precision, src, results, allow_failed_gate,
                             (summary.get("gate") or {}).get(precision))) is not None:
            gates[precision] = verdict
        arc = f"engines/{model}/{model}.{precision}.onnx"
        describe[arc] = _describe_onnx(src, model, precision)
        files[precision] = arc
        members[arc] = src
    _check_one_source(describe, summary)
    members[f"engines/{model}/{model}.export.json"] = summary_path
    calib_key = None
    if any(onnx_meta.variant_facts(p)[0] == "int8" for p in precisions):
        calib_key, calib_path = _calibration_manifest(summary, calibration)
        members[f"calibration/{calib_key}/manifest.json"] = calib_path
    members["README.md"] = readme_text(name, model, files, describe).encode("utf-8")
    facts = {"name": name, "model": model, "precisions": list(precisions), "onnx": files,
             "classes": next(iter(describe.values()))["classes"],
             "checkpoint_sha256": summary.get("checkpoint_sha256"), "calibration": calib_key,
             "lungedge_version": __version__, "metadata": describe}
    if gates:
        facts["release_gate"] = gates
    return members, facts


def _checksums(members: dict, facts: dict) -> tuple[bytes, bytes]:
    """The manifest (facts + every member's SHA-256 and size) and SHA256SUMS, as bytes."""
    entries = {}
    for arc, src in members.items():
        if isinstance(src, bytes):
            entries[arc] = {"sha256": hashlib.sha256(src).hexdigest(), "size": len(src)}
        else:
            entries[arc] = {"sha256": sha256_file(src), "size": src.stat().st_size}
    manifest = {"format": FORMAT, **facts, "files": dict(sorted(entries.items()))}
    manifest_bytes = dumps_json(manifest).encode("utf-8")
    sums = dict(entries, **{MANIFEST: {"sha256": hashlib.sha256(manifest_bytes).hexdigest()}})
    sums_bytes = "".join(f"{v['sha256']}  {k}\n" for k, v in sorted(sums.items())).encode("utf-8")
    return manifest_bytes, sums_bytes


def _write_archive(out: Path, name: str, members: dict) -> None:
    """A deterministic .tar.gz (fixed mtimes, owners, modes, order), written atomically."""
    mtime = max(int(p.stat().st_mtime) for p in members.values() if isinstance(p, Path))
    check_replaceable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:  # read-only folder, a file where the folder must be: the error names OUT
        raise write_error(out, exc) from None
    dirs = {str(p) for arc in members for p in PurePosixPath(arc).parents} - {"."}
    try:
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    tar.addfile(_dir_entry(name, mtime))
                    for d in sorted(dirs):
                        tar.addfile(_dir_entry(f"{name}/{d}", mtime))
                    for arc in sorted(members):
                        src = members[arc]
                        _tar_add(tar, f"{name}/{arc}", src if isinstance(src, bytes) else None,
                                 src if isinstance(src, Path) else None, mtime)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename in (None, tmp):  # writing failed (full disk: no file named), not reading a member
            raise write_error(out, exc) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create(model: str, out: str | Path, precisions: list[str] | None = None, engines: str | Path = "engines",
           calibration: str | Path = "calibration", results: str | Path | None = None,
           allow_failed_gate: bool = False) -> dict:
    """Write the bundle of MODEL's exported ONNX files to ``out`` (atomically); return its manifest.
    With ``results`` (eval's results folder), a precision whose release gate failed is refused."""
    out = Path(out)
    name = bundle_name(out)
    members, facts = _members(name, model, precisions, Path(engines), Path(calibration), results, allow_failed_gate)
    members[MANIFEST], members[SUMS] = _checksums(members, facts)
    _write_archive(out, name, members)
    return {"path": str(out), "sha256": sha256_file(out), "size": out.stat().st_size,
            "manifest": json.loads(members[MANIFEST])}


# -- verifying ---------------------------------------------------------------------------------------

def _member_filter(bundle: Path):
    """tarfile's "data" extraction filter (no absolute paths, nothing outside the destination, no
    device files, sane modes), and only regular files and folders (no links)."""
    def check(info: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        if not (info.isreg() or info.isdir()):
            raise LungedgeError(f"{bundle} holds {info.name!r}, which is not a regular file "
                                f"(link or device); refusing it")
        try:
            return tarfile.data_filter(info, dest)
        except tarfile.FilterError as exc:
            raise LungedgeError(f"{bundle} holds an unsafe member path {info.name!r} ({exc}); refusing it") from None
    return check


_NOWHERE = "/nonexistent/lungedge-bundle"  # the destination verify checks member paths against


def _read_members(bundle: Path):
    """Yield (relative name, TarInfo, bytes or digest) while checking every member's safety."""
    if not bundle.is_file():
        raise LungedgeError(f"bundle not found: {bundle}")
    top = None
    seen = set()
    safe = _member_filter(bundle)
    try:
        with tarfile.open(bundle, mode="r:gz") as tar:
            for info in tar:
                path = PurePosixPath(safe(info, _NOWHERE).name)
                if top is None:
                    top = path.parts[0]
                if path.parts[0] != top:
                    raise LungedgeError(f"{bundle} has members outside its top folder {top}/ ({info.name})")
                rel = "/".join(path.parts[1:])
                if info.isdir():
                    continue
                if not rel:
                    raise LungedgeError(f"{bundle}: {info.name!r} is a file where the top folder should be")
                if rel in seen:
                    raise LungedgeError(f"{bundle} holds {rel} twice")
                seen.add(rel)
                fh = tar.extractfile(info)
                h, size, keep = hashlib.sha256(), 0, bytearray()
                while block := fh.read(_CHUNK):
                    h.update(block)
                    size += len(block)
                    if rel in (MANIFEST, SUMS) and len(keep) < (16 << 20):
                        keep += block
                if size != info.size:
                    raise EOFError(f"{info.name} ends early")
                yield top, rel, info, h.hexdigest(), size, bytes(keep)
            # read to the very end, so the gzip trailer (CRC, length) is checked too
            while tar.fileobj.read(_CHUNK):
                pass
    except LungedgeError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise LungedgeError(f"{bundle} is truncated or corrupt ({str(exc) or type(exc).__name__}); "
                            f"copy it again") from None
    if top is None:
        raise LungedgeError(f"{bundle} is empty")


def verify(bundle: str | Path) -> dict:
    """Check every member of ``bundle`` against its manifest; return the manifest and top folder."""
    bundle = Path(bundle)
    found: dict[str, tuple[str, int]] = {}
    manifest_bytes = sums_bytes = None
    top = None
    for top, rel, _info, digest, size, data in _read_members(bundle):
        found[rel] = (digest, size)
        if rel == MANIFEST:
            manifest_bytes = data
        elif rel == SUMS:
            sums_bytes = data
    if manifest_bytes is None:
        raise LungedgeError(f"{bundle} has no {MANIFEST}; it is not a lungedge bundle")
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LungedgeError(f"{bundle}: its {MANIFEST} is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise LungedgeError(f"{bundle}: {MANIFEST} is not a {FORMAT} manifest")
    listed = manifest["files"]
    missing = sorted(set(listed) - set(found))
    if missing:
        raise LungedgeError(f"{bundle} is missing {', '.join(missing)}")
    extra = sorted(set(found) - set(listed) - {MANIFEST, SUMS})
    if extra:
        raise LungedgeError(f"{bundle} holds files its manifest does not list: {', '.join(extra)}")
    for rel in sorted(listed):
        want = listed[rel]
        digest, size = found[rel]
        if size != want.get("size"):
            raise LungedgeError(f"{bundle}: {rel} has {size} bytes, the manifest says {want.get('size')} "
                                f"(changed or truncated)")
        if digest != want.get("sha256"):
            raise LungedgeError(f"{bundle}: {rel} does not match its SHA-256 in the manifest (changed)")
    if sums_bytes is not None:
        sums = {}
        for line in sums_bytes.decode("utf-8", "replace").splitlines():
            m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line.strip())
            if not m:
                raise LungedgeError(f"{bundle}: {SUMS} has a malformed line {line[:80]!r}")
            sums[m.group(2)] = m.group(1)
        expected = {k: v["sha256"] for k, v in listed.items()}
        expected[MANIFEST] = found[MANIFEST][0]
        if sums != expected:
            bad = sorted(k for k in set(sums) | set(expected) if sums.get(k) != expected.get(k))
            raise LungedgeError(f"{bundle}: {SUMS} disagrees with the bundle on {', '.join(bad)}")
    else:
        raise LungedgeError(f"{bundle} has no {SUMS}")
    if manifest.get("name") and manifest["name"] != top:
        raise LungedgeError(f"{bundle}: top folder {top}/ does not match the manifest's name {manifest['name']}")
    return {"path": str(bundle), "top": top, "files": len(listed) + 2, "manifest": manifest}


def extract(bundle: str | Path, to: str | Path = ".") -> Path:
    """Verify ``bundle``, then unpack it into ``to/<top>/`` (refusing to overwrite an existing folder).

    ``to/<top>`` is locked while it is unpacked (a second extract of the same bundle is refused in one line)
    and filled through a staging folder beside it, so a kill leaves no half folder; the next extract removes
    the staging folder a killed one left."""
    bundle, to = Path(bundle), Path(to)
    checked = verify(bundle)
    dest = to / checked["top"]
    if dest.exists():
        raise LungedgeError(f"{dest} already exists; remove it or extract elsewhere with --to DIR")
    with FolderLock(dest, "lungedge bundle extract"):
        clean_stale(dest)  # what a killed extract left
        if dest.exists():  # another extract finished while this one verified
            raise LungedgeError(f"{dest} already exists; remove it or extract elsewhere with --to DIR")
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=to))
        except OSError as exc:
            raise write_error(to, exc, "cannot extract into") from None
        try:
            try:
                with tarfile.open(bundle, mode="r:gz") as tar:
                    tar.extractall(staging, filter=_member_filter(bundle))
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise LungedgeError(f"{bundle} changed while extracting ({exc}); copy it again") from None
            except OSError as exc:  # full disk, read-only folder: name the folder, not the staging one
                raise write_error(dest, exc, "cannot extract into") from None
            for rel, want in checked["manifest"]["files"].items():  # re-check what landed on disk
                if sha256_file(staging / checked["top"] / rel) != want["sha256"]:
                    raise LungedgeError(f"{rel} changed while extracting {bundle}; copy the bundle again")
            os.rename(staging / checked["top"], dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest
