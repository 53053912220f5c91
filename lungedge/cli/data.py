"""`lungedge data`: inspect a data set, split it by near-duplicate groups, audit a split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..data.defaults import DEFAULT_THRESHOLD, LOOSE_THRESHOLD, SPLITS
from ..errors import LungedgeError, display_name
from .common import print_json

app = typer.Typer(help="Inspect image folders, make leakage-aware splits and audit them.", no_args_is_help=True)


def _table(title: str, columns: list[str], rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*[str(v) for v in row])
    Console().print(table)


def _warn_shortcut(result) -> None:
    if result and result.get("warning"):
        typer.secho(f"WARNING: {result['warning']}", err=True, fg="red", bold=True)


def _print_shortcut(result) -> None:
    """The shortcut check's per-class table, its verdict and (loudly, on stderr) its warning."""
    if not result:
        return
    from ..data.shortcut import TABLE_COLUMNS, summary_line, table_rows

    _table("shortcut check: features that carry no anatomy, per class", list(TABLE_COLUMNS), table_rows(result))
    typer.echo(summary_line(result))
    _warn_shortcut(result)


@app.command("inspect")
def inspect_cmd(
    folder: Path = typer.Argument(..., help="Data set folder (IQ-OTH/NCCD, LC25000 or one folder per class)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    shortcuts: bool = typer.Option(True, "--shortcuts/--no-shortcuts", help="Run the shortcut check: can size, "
                                   "shape and intensity alone tell the classes apart (grouped CV)?"),
):
    """Classes, counts per class, image sizes and colour modes, byte-identical and unreadable files,
    and the shortcut check."""
    from ..data.split import inspect

    info = inspect(folder, shortcuts=shortcuts)
    if as_json:
        print_json(info)
        _warn_shortcut(info.get("shortcut"))
        return
    typer.echo(f"{display_name(info['root'])}  (layout: {info['layout']}, {info['total']} images)")
    _table("classes", ["class", "images", "readable", "non-square"],
           [(c, info["counts"][c], info["readable_counts"][c], info["non_square"][c]) for c in info["classes"]])
    sizes = list(info["sizes"].items())
    shown = sizes[:8] + ([("other sizes", sum(n for _, n in sizes[8:]))] if len(sizes) > 8 else [])
    _table("sizes", ["width x height", "images"], shown)
    _table("modes", ["colour mode", "images"], info["modes"].items())
    dup_files = sum(len(s) for s in info["identical"])
    typer.echo(f"byte-identical files: {dup_files} files in {len(info['identical'])} sets")
    for paths in info["identical"][:10]:
        typer.echo("  " + "  ==  ".join(map(display_name, paths)))
    if len(info["identical"]) > 10:
        typer.echo(f"  ... and {len(info['identical']) - 10} more sets (see --json)")
    typer.echo(f"unreadable files: {len(info['unreadable'])}")
    for bad in info["unreadable"]:
        typer.echo(f"  {display_name(bad['path'])}: {bad['reason']}")
    turned = info["exif_orientation"]
    typer.echo(f"images with an EXIF orientation: {turned['count']}" + (
        f" (first: {display_name(turned['first']['path'])}, {turned['first']['turn']} in photo viewers); lungedge "
        "trains and predicts on the pixels as stored, unturned" if turned["count"] else ""))
    if info["other_files"]:
        first = display_name(info["other_files"][0])
        typer.echo(f"non-image files ignored: {len(info['other_files'])} (first: {first})")
    for note in info["notes"]:
        typer.echo(f"note: {note}")
    _print_shortcut(info.get("shortcut"))


@app.command("split")
def split_cmd(
    folder: Path = typer.Argument(..., help="Data set folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest JSON to write."),
    val: float = typer.Option(0.15, help="Fraction of each class for validation."),
    test: float = typer.Option(0.15, help="Fraction of each class for the test split."),
    seed: int = typer.Option(0, help="Seed of the group shuffle."),
    group_by: str = typer.Option(
        "near-duplicate", "--group-by",
        help="near-duplicate: keep near-duplicate images (scan neighbours, augmented copies) in one split; "
        "none: split image by image (leaks; for comparison).",
    ),
    threshold: float = typer.Option(DEFAULT_THRESHOLD, help="Correlation above which two images are near-duplicates."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
):
    """Deterministic, class-stratified train/val/test split that keeps near-duplicate groups together."""
    from ..data.split import make_split, write_manifest

    if val == 0:  # make_split allows it (a calibration set is all 'train'); train refuses such a split
        raise LungedgeError("--val must be more than 0: training picks its best epoch (and early-stops) on the "
                            "validation part, and refuses a split without one")
    manifest = make_split(folder, val=val, test=test, seed=seed, group_by=group_by, threshold=threshold)
    write_manifest(manifest, out)
    summary = {k: manifest[k] for k in ("params", "dataset", "classes", "counts", "groups", "warnings")}
    summary["skipped"] = manifest["skipped"]
    summary["manifest"] = str(out)
    if as_json:
        print_json(summary)
        return
    classes = manifest["classes"]
    _table(f"split of {manifest['dataset']['root']} ({manifest['groups']} groups, group-by {group_by})",
           ["split", *classes, "total"],
           [(s, *[manifest["counts"][s][c] for c in classes], sum(manifest["counts"][s].values()))
            for s in SPLITS])
    for bad in manifest["skipped"]:
        typer.echo(f"skipped {display_name(bad['path'])}: {bad['reason']}")
    for w in manifest["warnings"]:
        typer.echo(f"warning: {w}")
    typer.echo(f"wrote {out}")


@app.command("audit")
def audit_cmd(
    manifest: Path = typer.Argument(..., help="Split manifest written by 'lungedge data split'."),
    threshold: Optional[list[float]] = typer.Option(
        None, help=f"Near-duplicate threshold; repeat for several (default: the manifest's and {LOOSE_THRESHOLD:.2f})."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data set root, if it moved since the split."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    shortcuts: bool = typer.Option(True, "--shortcuts/--no-shortcuts", help="Run the shortcut check over the "
                                   "manifest's groups."),
):
    """Count byte-identical and near-duplicate pairs that cross splits (leakage); the shortcut check."""
    from ..data.split import audit

    result = audit(manifest, thresholds=threshold, root=data, shortcuts=shortcuts)
    if as_json:
        print_json(result)
        _warn_shortcut(result.get("shortcut"))
        return
    _print_shortcut(result.get("shortcut"))
    ident = result["identical_cross_split"]
    rows = [("identical", result["identical_pairs"], ident["total"], ident["train-val"],
             ident["train-test"], ident["val-test"], "")]
    for near in result["near_duplicates"]:
        c = near["cross_split"]
        rows.append((f"near>={near['threshold']:.2f}", near["pairs"], c["total"], c["train-val"],
                     c["train-test"], c["val-test"],
                     f"{near['test_images_with_train_near_duplicate']} / {result['test_images']}"))
    typer.echo(f"{manifest}: group-by {result['group_by']}, {result['images']} images")
    _table("pairs of images that cross splits ('test leaked': test images with a near-duplicate in train)",
           ["pairs", "all", "crossing", "train-val", "train-test", "val-test", "test leaked"], rows)
