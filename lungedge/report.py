"""The accuracy-vs-latency report: report.md, a self-contained report.html and the scatter PNG.

Result rows (JSON lines written by ``bench`` and ``eval``, from any number of machines) are read
as they are: rows from different machines, settings (threads) or runs stay separate rows,
labelled with their machine (M1, M2, ...) and results file, and are never averaged.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .errors import LungedgeError
from .io import (FolderLock, atomic_write_png, atomic_write_text, clean_temp_files, note_kept, read_written,
                 retire, written_together)
from .metrics import UNDEFINED
from .provenance import machine_label
from .runners.registry import short_name

GROUP_COLUMNS = ("model", "total parameters", "layers (conv+dense)", "trainable parameters", "epochs",
                 "accuracy", "balanced accuracy", "batch size", "method", "library")


# -- reading and merging ---------------------------------------------------------------------------

def _rows_of(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        obj = json.loads(text)
        rows = obj.get("rows", []) if isinstance(obj, dict) else obj
    return [r for r in rows if isinstance(r, dict) and r.get("kind") in ("bench", "eval")]


def load_results(paths) -> list[dict]:
    """Every bench/eval row under the given files or folders, each tagged with its results file."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(list(p.rglob("*.jsonl")) + list(p.rglob("*.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise LungedgeError(f"results not found: {p}")
    rows = []
    for f in files:
        try:
            got = _rows_of(f)
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            raise LungedgeError(f"{f} is not a results file ({exc})") from None
        except OSError as exc:
            raise LungedgeError(f"cannot read {f}: {exc.strerror or exc}") from None
        from .validation import validate

        for i, r in enumerate(got, 1):
            validate("row", r, f"{f} row {i}")  # the fields the report reads are there and typed
            r["_file"] = f.name
        rows += got
    if not rows:
        raise LungedgeError(f"no bench or eval results in {', '.join(map(str, paths))}; run 'lungedge bench' / 'lungedge eval' first")
    return rows


def label_machines(rows: list[dict]) -> dict[str, dict]:
    """Give every distinct machine an id (M1, M2, ...) in first-seen order; sets row['machine']."""
    machines: dict[str, dict] = {}
    ids: dict[str, str] = {}
    for r in rows:
        label = machine_label(r.get("provenance") or {})
        if label not in ids:
            ids[label] = f"M{len(ids) + 1}"
            machines[ids[label]] = {"label": label, "provenance": r.get("provenance") or {}}
        r["machine"] = ids[label]
    return machines


def _threads(r) -> str:
    t = (r.get("provenance") or {}).get("threads")
    return "default" if t is None or str(t).startswith("onnxruntime default") else str(t)


def latency_rows(rows: list[dict]) -> list[dict]:
    """One line per (machine, results file, model, backend, device, precision file, artifact, threads):
    latency at batch 1 and throughput at the largest batch, plus the matching eval metrics."""
    groups: dict = {}
    for r in rows:
        if r["kind"] != "bench":
            continue
        key = (r["machine"], r["_file"], r["model"], r["backend"], r["device"], r["variant"], r["artifact_sha256"],
               _threads(r))
        groups.setdefault(key, []).append(r)
    evals = [r for r in rows if r["kind"] == "eval"]
    out = []
    used_evals = set()
    for key, rs in groups.items():
        machine, file, model, backend, device, variant, sha, threads = key
        plain = sorted((r for r in rs if not r["preprocessing"]), key=lambda r: r["batch_size"])
        prep = sorted((r for r in rs if r["preprocessing"]), key=lambda r: r["batch_size"])
        b1 = plain[0] if plain else None
        big = plain[-1] if plain else None
        same = [e for e in evals if (e["model"], e["backend"], e["variant"], e["artifact_sha256"]) ==
                (model, backend, variant, sha)]
        ev = next((e for e in same if e["machine"] == machine and e["device"] == device), None) or \
            (same[-1] if same else None)
        if ev is not None:
            used_evals.add(id(ev))
        out.append({"machine": machine, "file": file, "model": model, "backend": backend, "device": device,
                    "precision": variant, "threads": threads, "sha": sha,
                    "p50_b1": b1["latency_ms"]["p50"] if b1 else None, "b1": b1["batch_size"] if b1 else None,
                    "p99_b1": b1["latency_ms"].get("p99") if b1 else None,
                    "ips": big.get("throughput_ips") if big else None, "big": big["batch_size"] if big else None,
                    "vs_source": b1.get("vs_source") if b1 else None,
                    "prep_p50_b1": prep[0]["latency_ms"]["p50"] if prep else None,
                    "includes": b1.get("includes", "") if b1 else "", "eval": ev,
                    "eval_elsewhere": ev is not None and ev["machine"] != machine,
                    "date": (b1 or rs[0]).get("provenance", {}).get("date")})
    for e in evals:  # evaluated but not benchmarked
        if id(e) not in used_evals:
            out.append({"machine": e["machine"], "file": e["_file"], "model": e["model"], "backend": e["backend"],
                        "device": e["device"], "precision": e["variant"], "threads": _threads(e),
                        "sha": e["artifact_sha256"], "p50_b1": None, "b1": None, "p99_b1": None, "ips": None,
                        "big": None, "vs_source": None, "prep_p50_b1": None, "includes": "", "eval": e,
                        "eval_elsewhere": False, "date": e.get("provenance", {}).get("date")})
    out.sort(key=lambda x: (x["machine"], x["model"], x["backend"], x["precision"], x["file"]))
    return out


def group_table(rows: list[dict]) -> list[list[str]]:
    """The research group's comparison table, regenerated from our eval rows (source checkpoints)."""
    out = []
    seen = set()
    for r in rows:
        info = r.get("model_info")
        if r["kind"] != "eval" or not info:
            continue
        key = (r["model"], r["artifact_sha256"], r["machine"])
        if key in seen:
            continue
        seen.add(key)
        m = r["metrics"]
        out.append([f"{r['model']} ({r['artifact_sha256'][:8]}, {r['machine']})", _int(info.get("total_params")),
                    _int(info.get("weight_layers")), _int(info.get("trainable_params")),
                    _s(info.get("epochs")), f"{m['accuracy']:.3f}", f"{m['balanced_accuracy']:.3f}",
                    _s(info.get("batch_size")), _s(info.get("method")), _s(info.get("library"))])
    return out


def _int(v) -> str:
    return f"{int(v):,}" if v is not None else "–"


def _s(v) -> str:
    return "–" if v is None else str(v)


def _f(v, fmt=".2f") -> str:
    return "–" if v is None else format(v, fmt)


LAT_COLUMNS = ("machine", "model", "backend", "device", "precision", "threads", "balanced acc", "accuracy",
               "macro-F1", "sensitivity per class", "specificity per class", "≠ FP32", "p50 b1 ms", "p99 b1 ms", "+prep p50 b1 ms", "img/s (largest batch)",
               "× source (b1)", "test set", "intervals", "run")


def interval_label(ev: dict | None) -> str:
    """How the row's intervals were made, in a few words: level, bootstrap over groups or images, and whether
    an estimate of 0 or 1 got the exact interval instead."""
    ci = (ev or {}).get("intervals") or {}
    if not ci:
        return "none"
    method = ci.get("method", "")
    what = "image bootstrap (no groups)" if "over images" in method else "group bootstrap"
    exact = ci.get("exact_fallback")
    return (f"{ci.get('confidence', 0.95):.0%} {what}, {ci.get('groups', '?')} "
            f"{'images' if 'over images' in method else 'groups'}"
            + (f"; Clopper-Pearson exact for {', '.join(exact)} (estimate 0 or 1)" if exact else ""))


def test_set_label(ev: dict | None) -> str:
    """Which images the row's figures are on (count and split), and beside them what eval found about those
    images: a leak, test images or the whole set unlike the training images, images a viewer shows turned."""
    if not ev:
        return "–"
    text = f"{ev.get('test_set', '?')} ({ev['metrics'].get('n', '?')} images)" + _leak_label(ev)
    return "; ".join([text, *input_labels(ev)])


def input_labels(ev: dict) -> list[str]:
    """What the input check and the EXIF tags say about an eval row's test images, one short part each, where
    there is something to say: the share unlike the training images (> 0), a WARNING naming the descriptors
    where the set differs from them, a note where the set was not judged (an unwarned row would otherwise
    read as checked and alike), the count a viewer shows turned (> 0). Rows written before eval recorded
    these keys have none of them and get nothing (not "checked": nothing is known)."""
    from .inputcheck import LABELS

    out = []
    share, count = ev.get("unlike_training"), ev.get("unlike_training_count")
    if share:
        n = ev["metrics"].get("n")
        out.append((f"{count} of {n} test images ({share:.1%})" if count is not None and n
                    else f"{share:.1%} of the test images") + " unlike the training images (input check)")
    shift = ev.get("set_shift") or {}
    if shift.get("differs"):
        top = ", ".join(f"{LABELS.get(d, d)} by {shift['distance'][d]:.2f}" for d in shift["shifted"][:3])
        more = f" and {len(shift['shifted']) - 3} more" if len(shift["shifted"]) > 3 else ""
        out.append(f"WARNING: these images differ as a set from the training images ({top}{more}; Wasserstein "
                   f"distance in training spreads, threshold {shift['threshold']:.2f}): another scanner, protocol "
                   "or site?")
    elif shift and not shift.get("judged"):
        out.append(f"set check not judged: {str(shift.get('why', '')).split(' (')[0]}")
    if ev.get("exif_orientation_count"):
        out.append(f"{ev['exif_orientation_count']} image(s) carry an EXIF orientation: a viewer shows them "
                   "turned, the model saw them as stored")
    return out


def _leak_label(ev: dict) -> str:
    """The leak part of :func:`test_set_label`: '' where eval did not look (a row from before) or found none."""
    text = ""
    leak = ev.get("leakage") or {}
    if not leak:
        return text
    near = leak.get("near_duplicates") or {}
    if leak.get("in_training") or leak.get("in_validation") or near.get("in_training") or near.get("in_validation"):
        text += (f"; WARNING: {leak['in_training']} in training, {leak['in_validation']} in validation "
                 "(byte-identical)")
        if near:
            text += (f", {near['in_training']} in training, {near['in_validation']} in validation (near-duplicates, "
                     f"similarity ≥ {near['threshold']:g})")
    if not near:  # a row written before eval looked for near-duplicates
        text += "; near-duplicates of training images not checked"
    elif near.get("not_checked"):
        text += (f"; near-duplicates not checked against {near['not_checked']} of "
                 f"{near['not_checked'] + near['compared_with']} training/validation images "
                 "(unreadable: SHA-256 only)")
    return text


def _pm(m, ev, key) -> str:
    """'0.812 +0.031/−0.045': the value and its interval (``interval_label``) as distances (asymmetric)."""
    v = m.get(key) if m else None
    ci = ((ev or {}).get("intervals") or {}).get(key)
    if v is None:
        return "–"
    if not ci or ci[0] is None or ci[1] is None:
        return f"{v:.3f}"
    return f"{v:.3f} +{max(0.0, ci[1] - v):.3f}/−{max(0.0, v - ci[0]):.3f}"


def _per_class_pm(m, ev, key) -> str:
    if not m or not m.get(key):
        return "–"
    ci = ((ev or {}).get("intervals") or {}).get(key) or {}
    out = []
    for c, v in m[key].items():
        iv = ci.get(c)
        out.append(f"{c}=– ({UNDEFINED.get(key, 'undefined')})" if v is None else f"{c}={v:.2f}" + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else ""))
    return " ".join(out)


def latency_table(lat: list[dict]) -> list[list[str]]:
    out = []
    for x in lat:
        m = x["eval"]["metrics"] if x["eval"] else None
        d = x["eval"].get("differs_from_fp32") if x["eval"] else None
        note = f" (eval on {x['eval']['machine']})" if x["eval_elsewhere"] else ""
        if m and m.get("absent"):  # a class without test images: the average is over the others only
            note += f" (over {', '.join(m.get('averaged_over') or [])} only; no test images of {', '.join(m['absent'])})"
        out.append([x["machine"], x["model"], x["backend"], x["device"], x["precision"], x["threads"],
                    (_pm(m, x["eval"], "balanced_accuracy") + note) if m else "–", _pm(m, x["eval"], "accuracy"),
                    _pm(m, x["eval"], "macro_f1"), _per_class_pm(m, x["eval"], "sensitivity"),
                    _per_class_pm(m, x["eval"], "specificity"),
                    f"{d:.1%}" if d is not None else "–",
                    _f(x["p50_b1"]), _f(x["p99_b1"]), _f(x["prep_p50_b1"]),
                    f"{x['ips']:.1f} (b{x['big']})" if x["ips"] else "–",
                    f"{x['vs_source']:.2f}×" if x["vs_source"] else "–", test_set_label(x["eval"]),
                    interval_label(x["eval"]) if x["eval"] else "–", x["file"]])
    return out


# -- the plot ---------------------------------------------------------------------------------------

def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both lower latency and higher accuracy."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def scatter_png(lat: list[dict], path: Path) -> Path | None:
    pts = [x for x in lat if x["p50_b1"] and x["eval"]]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    markers = "osD^v<>PX*"
    machines = sorted({x["machine"] for x in pts})
    backends = sorted({x["backend"] for x in pts})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for x in pts:
        ax.scatter(x["p50_b1"], x["eval"]["metrics"]["balanced_accuracy"],
                   marker=markers[machines.index(x["machine"]) % len(markers)],
                   color=colours[backends.index(x["backend"]) % len(colours)], s=60, zorder=3)
        ci = (x["eval"].get("intervals") or {}).get("balanced_accuracy")
        if ci and ci[0] is not None:  # 95% group-bootstrap interval (issue #16)
            y = x["eval"]["metrics"]["balanced_accuracy"]
            ax.errorbar(x["p50_b1"], y, yerr=[[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]], fmt="none",
                        ecolor=colours[backends.index(x["backend"]) % len(colours)], capsize=3, lw=1, zorder=2)
    for mach in machines:
        mine = [x for x in pts if x["machine"] == mach]
        xy = [(x["p50_b1"], x["eval"]["metrics"]["balanced_accuracy"]) for x in mine]
        front = [xy[i] for i in pareto(xy)]
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", linestyle="--", color="grey",
                    linewidth=1, zorder=2, label=f"Pareto front {mach}")
    for b in backends:
        ax.scatter([], [], color=colours[backends.index(b) % len(colours)], label=b)
    for m in machines:
        ax.scatter([], [], marker=markers[machines.index(m) % len(markers)], color="black", label=m)
    ys = [x["eval"]["metrics"]["balanced_accuracy"] for x in pts]
    if max(ys) - min(ys) < 0.05 and not any((x["eval"].get("intervals") or {}).get("balanced_accuracy") for x in pts):  # do not blow tiny differences up to the full height
        mid = (max(ys) + min(ys)) / 2
        ax.set_ylim(mid - 0.03, mid + 0.03)
    ax.set_xscale("log")
    ax.set_xlabel("latency p50 at batch 1, model only (ms, log scale)")
    ax.set_ylabel("balanced accuracy (test set; bars: 95% interval, see table)")
    ax.set_title("Accuracy vs latency per model, backend and precision")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    place_labels(ax, [(x["p50_b1"], x["eval"]["metrics"]["balanced_accuracy"]) for x in pts],
                 [f"{x['model']} {short_name(x['backend'])} {x['precision']}" for x in pts])
    return atomic_write_png(path, fig)


CAL_COLUMNS = ("machine", "model", "backend", "precision", "temperature", "images", "top-1 accuracy",
               "mean confidence", "confidence − accuracy", "ECE [95% CI]", "Brier [95% CI]", "test set",
               "results file")
CAL_NOTE = ("Whether a probability means what it says: of the images a well-calibrated model calls at 90 %, "
            "90 % are right. ECE: top-label expected calibration error over 10 equal-width confidence bins "
            "(0 is perfect; on a small test set it is biased upward, so its interval can sit above it). "
            "Brier: mean over images of the sum over classes of (p − y)² (0 perfect, 2 worst). "
            "Confidence above accuracy is over-confidence. Temperature: what export fitted on the validation "
            "images to divide the logits by (1: none; a checkpoint has none). "
            "Intervals: 95% bootstrap over near-duplicate groups (over images where the test set had none). "
            "In the diagram each point is one confidence bin (its size: the number of images); on the "
            "diagonal, confidence equals accuracy.")


def _calibrated(rows) -> list[dict]:
    return [r for r in rows if r["kind"] == "eval" and (r["metrics"].get("calibration") or {}).get("ece") is not None]


def calibration_table(rows) -> list[list[str]]:
    """One line per eval row that measured calibration (:func:`lungedge.metrics.calibration`)."""
    from .stats import pm

    out = []
    for r in _calibrated(rows):
        cal, ci = r["metrics"]["calibration"], r.get("intervals") or {}
        out.append([r["machine"], r["model"], r["backend"], r["variant"], f"{r.get('temperature', 1.0):.2f}",
                    _s(r["metrics"].get("n")),
                    f"{cal['top1_accuracy']:.3f}", f"{cal['mean_confidence']:.3f}",
                    f"{cal['mean_confidence'] - cal['top1_accuracy']:+.3f}", pm(cal["ece"], ci.get("ece")),
                    pm(cal["brier"], ci.get("brier")), test_set_label(r), r["_file"]])
    return out


def reliability_png(rows, path: Path) -> Path | None:
    """Reliability diagrams: one panel per model, a line per backend, precision and machine."""
    rows = _calibrated(rows)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    cols = min(len(models), 3)
    lines = -(-len(models) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 4.0 * lines), dpi=110, squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax, model in zip(axes.flat, models):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        for r in (r for r in rows if r["model"] == model):
            rel = r["metrics"]["calibration"]["reliability"]
            label = f"{short_name(r['backend'])} {r['variant']} {r['machine']}"
            line, = ax.plot([b["confidence"] for b in rel], [b["accuracy"] for b in rel], linewidth=1, label=label)
            ax.scatter([b["confidence"] for b in rel], [b["accuracy"] for b in rel],
                       s=[12 + 120 * b["n"] / r["metrics"]["n"] for b in rel], color=line.get_color(), zorder=3)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("mean confidence in bin (top class)")
        ax.set_ylabel("accuracy in bin")
        ax.set_title(model)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    return atomic_write_png(path, fig)


def _label_offsets():
    """Offsets (points) tried for a label, nearest first: 14 directions on rings of growing radius."""
    import math

    out = []
    for radius in (6, 12, 20, 30, 42, 56, 72, 90):
        for deg in (15, -15, 165, 195, 90, 270, 45, -45, 135, 225, 60, -60, 120, 240):
            dx, dy = radius * math.cos(math.radians(deg)), radius * math.sin(math.radians(deg))
            out.append((dx, dy, "left" if dx > 1 else "right" if dx < -1 else "center",
                        "bottom" if dy > 1 else "top" if dy < -1 else "center_baseline"))
    return out


def place_labels(ax, xy: list[tuple[float, float]], labels: list[str], fontsize: int = 7) -> list:
    """Annotate each point with its label where it covers no earlier label, no point and no legend and
    stays inside the axes: the nearest free place of :func:`_label_offsets` (a thin leader line when it is
    not next to its point), else the place overlapping least. Call it once the layout is final (the
    extents are measured). Returns the annotations."""
    from matplotlib.text import Text

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    dots = [ax.transData.transform(p) for p in xy]
    r = 4.0 * fig.dpi / 72  # a marker's half size in pixels
    taken = [(x - r, y - r, x + r, y + r) for x, y in dots]
    if ax.get_legend() is not None:  # where the legend was drawn ("best") stays the legend's
        e = ax.get_legend().get_window_extent(renderer)
        taken.append((e.x0, e.y0, e.x1, e.y1))

    def overlap(a, b) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    area = (inside.x0, inside.y0, inside.x1, inside.y1)
    offsets = _label_offsets()
    texts = []
    for k in sorted(range(len(xy)), key=lambda k: (dots[k][0], dots[k][1])):  # left to right
        best = None
        for dx, dy, ha, va in offsets:
            far = dx * dx + dy * dy > 13 ** 2
            t = ax.annotate(labels[k], xy[k], textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                            fontsize=fontsize, arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey",
                                                           "shrinkA": 0, "shrinkB": 3} if far else None)
            t.update_positions(renderer)
            e = Text.get_window_extent(t, renderer)  # the text alone (an Annotation's adds its leader line)
            box = (e.x0, e.y0, e.x1, e.y1)
            cost = sum(overlap(box, o) for o in taken) + (e.width * e.height - overlap(box, area))  # + outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, t, box)
            else:
                t.remove()
            if cost == 0:
                break
        taken.append(best[2])
        texts.append(best[1])
    return texts


# -- rendering --------------------------------------------------------------------------------------

def _md_text(v) -> str:
    """Text for one line of Markdown: no line breaks (they would end a table row or a heading), and no
    raw HTML (a class or model named <script> stays text; Markdown renderers pass HTML through), no link
    or image (``[x](javascript:...)``) and no code span."""
    text = " ".join(html.escape(str(v), quote=False).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("](", "]\\(").replace("`", "\\`")


def _md_table(header, rows) -> str:
    cell = _md_text
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header, rows) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<div class='wrap'><table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table></div>"


def _confusions(rows):
    out = []
    for r in rows:
        if r["kind"] != "eval":
            continue
        classes = r["classes"]
        header = ["true \\ predicted", *classes]
        table = [[c, *counts] for c, counts in zip(classes, r["metrics"]["confusion_matrix"])]
        title = " · ".join([r["model"], r["backend"], r["device"], r["variant"], r["machine"], r.get("test_set", "")])
        out.append((title, header, table))
    return out


PROV_COLUMNS = ("kind", "model", "backend", "device", "precision", "batch", "+prep", "machine", "threads", "date",
                "artifact sha256", "what the time includes", "results file")


def provenance_rows(rows):
    out = []
    for r in rows:
        p = r.get("provenance") or {}
        out.append([r["kind"], r["model"], r["backend"], r["device"], r["variant"], _s(r.get("batch_size")),
                    _s(r.get("preprocessing")) if r["kind"] == "bench" else "–", r["machine"], _s(p.get("threads")),
                    _s(p.get("date")), r["artifact_sha256"][:16], r.get("includes", "–") if r["kind"] == "bench" else
                    r.get("test_set", ""), r["_file"]])
    return out


def machine_rows(machines):
    out = []
    for mid, m in machines.items():
        p = m["provenance"]
        libs = ", ".join(f"{k} {v}" for k, v in sorted((p.get("libraries") or {}).items()))
        out.append([mid, _s(p.get("host")), _s(p.get("cpu")),
                    f"{_s(p.get('cpu_logical_cores'))} logical / {_s(p.get('cpu_physical_cores'))} physical",
                    _s(p.get("gpu")), _s(p.get("gpu_driver")), _s(p.get("os")), _s(p.get("python")), libs,
                    json.dumps(p.get("jetson")) if p.get("jetson") else "–"])
    return out


MACHINE_COLUMNS = ("id", "host", "CPU", "cores", "GPU", "driver", "OS", "Python", "libraries", "Jetson")

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1600px}
table{border-collapse:collapse;margin:8px 0 20px;font-size:12px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#f0f0f0}h1{font-size:22px}h2{font-size:18px;margin-top:28px}h3{font-size:14px}
img{max-width:100%;border:1px solid #ddd}.wrap{overflow-x:auto;max-width:100%}p.note{color:#555;font-size:13px}"""


GATE_COLUMNS = ("machine", "model", "backend", "precision", "vs", "Δ balanced acc [95% CI]",
                "Δ sensitivity per class [95% CI]", "flips", "McNemar p", "judged on", "gate")


def _evidence(gate: dict) -> str:
    """How much the gate rests on: images, groups, and the exact bound a bootstrap of few changes hides."""
    ev = gate.get("evidence")
    if not ev:
        return "–"
    return (f"{ev['images']} images, {ev['groups']} groups; up to {ev['worse_share_upper']:.1%} of groups could "
            f"lose a right answer (exact 95%, {ev['groups_worse']} observed)")


def gate_table(rows: list[dict]) -> list[list[str]]:
    """The release gate of every reduced-precision eval row (paired group bootstrap vs FP32, McNemar)."""
    out = []
    for r in rows:
        g = r.get("gate") if r["kind"] == "eval" else None
        if not g:
            continue
        b = g["paired"]["balanced_accuracy"]
        sens = " ".join(f"{c}={v['delta']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]"
                        for c, v in g["paired"]["sensitivity"].items() if v)
        out.append([r["machine"], r["model"], r["backend"], r["variant"], _s(r.get("fp32_reference")),
                    f"{b['delta']:+.3f} [{b['ci'][0]:+.3f}, {b['ci'][1]:+.3f}]", sens, g["mcnemar"]["flips"],
                    f"{g['mcnemar']['p_value']:.3g}", _evidence(g), "pass" if g["pass"] else "FAIL"])
    return out


def build_report(results, out="reports", title="lungedge accuracy vs latency", saliency: bool = True,
                 log=lambda s: None) -> dict:
    """report.md and a self-contained report.html (plus the PNGs) from bench/eval results files. A Ctrl-C (or
    SIGTERM) leaves the previous report whole or the new one complete, and notes which (:func:`kept_line`)."""
    out = Path(out)
    had = (out / "report.md").is_file()
    together = None
    try:
        rows = load_results(results if isinstance(results, (list, tuple)) else [results])
        machines = label_machines(rows)
        lat = latency_rows(rows)
        # one report at a time into OUT (two would each rename their files into place: a mixed set), and what
        # a killed one left under temporary names goes
        with FolderLock(out, "lungedge report"):
            clean_temp_files(out, REPORT_FILES)
            with written_together() as together:  # the page and its PNGs: all new, or all as they were
                return _write_report(rows, machines, lat, out, title, saliency, log)
    except KeyboardInterrupt:
        note_kept(kept_line(out, had, together is not None and together.committed))
        raise


def kept_line(out: Path, had: bool, committed: bool) -> str:
    """What an interrupted report leaves in ``out``, said after "interrupted": its files are one set, so the
    new report whole (the stop came while it took its names, which are completed) or the folder as it was."""
    if committed:
        return f"{out} holds the new report, complete"
    return f"nothing written: {out} holds the previous report as it was" if had else f"nothing written to {out}"


REPORT_FILES = ("accuracy_latency.png", "saliency.png", "reliability.png", "report.md", "report.html")


def _write_report(rows, machines, lat, out: Path, title: str, saliency: bool, log) -> dict:
    png = scatter_png(lat, out / "accuracy_latency.png")
    grid = None
    if saliency:
        from .saliency import report_grid

        grid = report_grid(rows, out / "saliency.png", log=log)
    n_b, n_e = sum(r["kind"] == "bench" for r in rows), sum(r["kind"] == "eval" for r in rows)
    intro = (f"{n_b} bench rows and {n_e} eval rows from {len(machines)} machine(s). Rows from different machines, "
             "thread settings or runs are separate rows labelled by machine id and results file, never averaged. "
             "Latency is measured after warm-up; 'model only' times one infer call on a preprocessed batch "
             "(on a GPU including host<->device copies), '+prep' adds decoding and preprocessing the image files.")
    rel = reliability_png(rows, out / "reliability.png")
    sections = report_sections(rows, machines, lat, png, grid, rel)
    md_path = atomic_write_text(out / "report.md", _markdown(title, intro, sections))
    html_path = atomic_write_text(out / "report.html", _html(title, intro, sections))
    drawn = {Path(p).name for p in (png, grid, rel, md_path, html_path) if p}
    for name in REPORT_FILES:  # a figure this report does not draw: the previous report's goes with it
        if name not in drawn:
            retire(out / name)
    return {"markdown": str(md_path), "html": str(html_path), "png": str(png) if png else None,
            "reliability": str(rel) if rel else None,
            "saliency": str(grid) if grid else None,
            "rows": len(rows), "machines": {k: v["label"] for k, v in machines.items()}}


GATE_NOTE = ("Each reduced precision against FP32 on the same images: change with a paired bootstrap over "
             "near-duplicate groups, McNemar's exact test on the images only one of the two gets right; "
             "the gate passes when the interval's lower bound stays above the allowed drop.")
GRID_NOTE = ("Per class, test images the FP32 model classifies right and wrong, each with its occlusion map "
             "for FP32 and INT8 (red: covering this region lowers the predicted class's probability most).")


def report_sections(rows, machines, lat, png, grid, reliability=None) -> list[tuple]:
    """The report's sections, in order, for both renderings: (level, heading, note, body) with body
    ("table", columns, rows) | ("image", alt, path) | ("none", text)."""
    group, gates = group_table(rows), gate_table(rows)
    out = [(2, "Machines", None, ("table", MACHINE_COLUMNS, machine_rows(machines))),
           (2, "The research group's comparison table (regenerated from our runs)", None,
            ("table", GROUP_COLUMNS, group) if group else ("none", "no eval rows of source checkpoints")),
           (2, "Accuracy and latency per backend and precision", None, ("table", LAT_COLUMNS, latency_table(lat)))]
    if png:
        out.append((2, "Accuracy vs latency (Pareto front dashed)", None, ("image", "accuracy vs latency", png)))
    if gates:
        out.append((2, "Release gate: reduced precision vs FP32", GATE_NOTE, ("table", GATE_COLUMNS, gates)))
    cal = calibration_table(rows)
    if cal:
        out.append((2, "Calibration: do the probabilities mean what they say?", CAL_NOTE,
                    ("table", CAL_COLUMNS, cal)))
    if reliability:
        out.append((3, "Reliability diagrams", None, ("image", "reliability diagrams", reliability)))
    if grid:
        out.append((2, "Where the models look", GRID_NOTE, ("image", "saliency maps", grid)))
    out.append((2, "Confusion matrices (rows: true class, columns: predicted)", None, None))
    out += [(3, t, None, ("table", h, tb)) for t, h, tb in _confusions(rows)]
    out.append((2, "Provenance of every row", None, ("table", PROV_COLUMNS, provenance_rows(rows))))
    return out


def _markdown(title: str, intro: str, sections) -> str:
    md = [f"# {_md_text(title)}", "", _md_text(intro), ""]
    for level, heading, note, body in sections:
        md += [f"{'#' * level} {_md_text(heading)}", ""] + ([note, ""] if note else [])
        if body is None:
            continue
        if body[0] == "table":
            md.append(_md_table(body[1], body[2]))
        elif body[0] == "image":
            md.append(f"![{_md_text(body[1])}]({body[2].name})")
        else:
            md.append(f"_{_md_text(body[1])}_")
        md.append("")
    return "\n".join(md)


def _html(title: str, intro: str, sections) -> str:
    """Self-contained: inline CSS, the PNGs as base64."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p class='note'>{html.escape(intro)}</p>"]
    for level, heading, note, body in sections:
        parts.append(f"<h{level}>{html.escape(heading)}</h{level}>")
        if note:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
        if body is None:
            continue
        if body[0] == "table":
            parts.append(_html_table(body[1], body[2]))
        elif body[0] == "image":
            b64 = base64.b64encode(read_written(body[2])).decode("ascii")
            parts.append(f"<img alt='{html.escape(body[1], quote=True)}' src='data:image/png;base64,{b64}'>")
        else:
            parts.append(f"<p>{html.escape(body[1])}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
