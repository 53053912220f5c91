"""Small file helpers: atomic writes, hashing, folder locks, staged folders and path containment.

* :func:`atomic_write_bytes` writes through a temporary sibling and renames: a reader never sees
  a half-written file; a failed write (read-only folder, full disk) is one :class:`WriteError` line
  naming the path. :func:`written_together` makes a set of such files (a report's page and its PNGs,
  a training epoch's checkpoints and metrics) all new or all as they were; :func:`retire` removes a file of the
  previous set that the new one does not write again, with it.
* :class:`FolderLock` marks a folder as being written (``.<name>.lock`` beside it, naming the holder:
  pid, host, command, start time). The lock is an ``flock`` on that file, so the kernel drops it when
  the holder dies, however it died: a lock left by a killed process is reclaimed by the next writer.
* :func:`shared_writers` lets several processes write into one folder at once (``results/``): each holds a
  shared ``flock`` there while it has temporaries, and one that finds no other writer removes what a killed
  one left.
* :func:`staged_folder` writes a set of files into a temporary sibling folder and moves it into
  place only when all of it is written (and checked): a kill leaves the previous complete set or
  nothing, never a mix.
* :func:`safe_name` and :func:`contained` keep run names and manifest entries inside their roots.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from glob import escape as glob_escape
from typing import Any, Callable, Iterable, Iterator

from .errors import LungedgeError


class WriteError(LungedgeError):
    """A file or folder could not be written (read-only, full disk, not a folder, ...)."""


class LockedError(LungedgeError):
    """Another process is writing the folder."""


# what the command being run is called in lock files ("lungedge train"); set by the CLI
COMMAND = "lungedge"
# what an interrupted command kept or left untouched, printed after "interrupted" by the CLI
KEPT: list[str] = []


def note_kept(note: str) -> None:
    if note not in KEPT:
        KEPT.append(note)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file
_DIR_MODE = 0o777 & ~_umask()  # what mkdir would give a new folder


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def not_a_folder(path: str | os.PathLike) -> Path | None:
    """The file in the way where a folder must be: the nearest of ``path`` and its parents that exists,
    unless that is a folder (then None)."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def write_error(path, exc: OSError, what: str = "cannot write") -> WriteError:
    """The one line for a failed write: ``cannot write PATH: No space left on device``."""
    if isinstance(exc, IsADirectoryError) or (exc.errno == errno.EISDIR):
        return WriteError(f"{what} {path}: it is an existing folder; give a file path")
    blocker = not_a_folder(path) if exc.errno in (errno.EEXIST, errno.ENOTDIR) else None
    if blocker is not None:  # a file where a folder must be: mkdir says "File exists", open "Not a directory"
        return WriteError(f"{blocker} exists and is not a folder" if blocker == Path(path)
                          else f"{what} {path}: {blocker} exists and is not a folder")
    return WriteError(f"{what} {path}: {_reason(exc)}")


def check_replaceable(path: str | os.PathLike) -> None:
    """Refuse an output path that names a device, a pipe or a socket (``/dev/null``, ``/dev/full``): a file
    renamed over it would replace the device itself (as root, for every program on the machine)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # not there (or unreachable: the write says why)
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a pipe" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise WriteError(f"cannot write {path}: it is {kind}, not a file; give a file path")


def _publish_new(tmp: str, path: Path) -> None:
    """Give the complete file ``tmp`` the name ``path`` only if nothing has it: FileExistsError else.
    A hard link takes the name atomically; where the file system has none, the name is taken with
    O_EXCL first (an empty file for an instant) and the complete file renamed over it."""
    try:
        os.link(tmp, path)
    except OSError as exc:  # FileExistsError (EEXIST) among them: raised as it is
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE))
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, exclusive: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    A reader never sees a half-written file, and an existing file is replaced only
    once the new one is complete. A failure is a :class:`WriteError` naming ``path``.
    ``exclusive``: never replace an existing file; FileExistsError (nothing written) if ``path`` is
    taken, also by another process writing it at the same moment.
    """
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"cannot write {path}: it is an existing folder; give a file path")
    check_replaceable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            _publish_new(tmp, path)
        else:
            _name(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exclusive and isinstance(exc, FileExistsError):
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        raise write_error(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_TOGETHER = threading.local()


def _name(tmp: str, path: Path) -> None:
    """Give the complete file ``tmp`` the name ``path`` (a rename); inside :func:`written_together`, when
    the block ends."""
    pending = getattr(_TOGETHER, "pending", None)
    if pending is None:
        os.replace(tmp, path)
        return
    earlier, pending[path] = pending.get(path), tmp
    if earlier:
        Path(earlier).unlink(missing_ok=True)


def publish_file(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Name ``tmp``, a complete file that a library which wants a file name of its own (h5py, Keras) wrote
    beside ``path``, as :func:`atomic_write_bytes` names its files: ``path`` at once, or with the rest of
    the set when a :func:`written_together` block ends. Like those, the file gets the usual permissions (a
    library writing into mkstemp's file left it 0600) and its bytes reach the disk (fsync) before any name,
    or a journal naming it, does. A failure removes ``tmp`` (:class:`WriteError`)."""
    path = Path(path)
    try:
        check_replaceable(path)
    except WriteError:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        os.chmod(tmp, _FILE_MODE)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _name(str(tmp), path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc) from None
    return path


class TogetherSet:
    """What a :func:`written_together` block yields: ``committed`` turns true once its set takes its names (a
    Ctrl-C during the renames still completes them), ``files`` is how many files the set named. An interrupted
    command reads it to say what the user has: the new set, or the previous files as they were."""

    def __init__(self):
        self.committed = False
        self.files = 0


@contextmanager
def written_together() -> Iterator[TogetherSet]:
    """A set of files that is never half old, half new (a report's page and its PNGs), also across a kill:
    inside the block each :func:`atomic_write_bytes` leaves its complete file under a temporary name; when the
    block ends they all take their names (a rename each: no space needed), and on an error none does and the
    temporaries go. Before the first rename a journal (:data:`JOURNAL`, in the files' folder) lists the
    renames; a process killed between them leaves it, and the next :class:`FolderLock` of the folder (or a
    reader's :func:`settle`) completes them (:func:`roll_forward`). :func:`read_written` reads a file
    written in the block. It yields a :class:`TogetherSet` (the outer block's, when nested)."""
    if getattr(_TOGETHER, "pending", None) is not None:  # nested: the outer block publishes
        yield _TOGETHER.state
        return
    pending: dict[Path, str] = {}
    retired: dict[Path, None] = {}
    state = TogetherSet()
    _TOGETHER.pending, _TOGETHER.retired, _TOGETHER.state = pending, retired, state
    try:
        yield state
    except BaseException:
        for tmp in pending.values():
            Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _TOGETHER.pending = _TOGETHER.retired = _TOGETHER.state = None
    retired = {path: None for path in retired if path not in pending}  # a file the set writes again stays
    if pending or retired:  # each path passed check_replaceable when its file was written (atomic_write_bytes, ...)
        _commit(pending, list(retired), state)


def retire(path: str | os.PathLike) -> None:
    """Remove ``path``, a file of the previous set that the new one does not write again (a report's PNG it no
    longer draws, an overlay of the same image under the class an earlier model gave it): inside a
    :func:`written_together` block when the set takes its names (listed in its journal, so across a kill the
    folder holds the old set or the new one, never the new set beside the old set's leftovers); outside, at once."""
    path = Path(path)
    retired = getattr(_TOGETHER, "retired", None)
    if retired is None:
        _remove(path)
    else:
        retired[path] = None


def _remove(path: Path) -> None:
    """Remove the file ``path`` if it is one (a folder or a file that cannot be removed stays as it is)."""
    try:
        if not path.is_dir():
            path.unlink(missing_ok=True)
    except OSError:
        pass


# the journal of a set being renamed into place (see written_together); one per folder
JOURNAL = ".lungedge-publish.json"
_JOURNAL_KIND = "lungedge publish journal"


def _renaming(index: int, tmp: str, path: Path) -> None:
    """Called before each rename of a set's commit (``index`` from 0); nothing. Tests replace it in a child
    process to kill that process between two renames."""


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a file system without directory fsync is left as it is)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _ours(tmp: str, name: str) -> bool:
    """``tmp`` is a temporary lungedge writes for ``name`` in the same folder: ``.NAME.XXXXXXXX.tmp``
    (:func:`atomic_write_bytes`) or ``.STEM.XXXXXXXX.SUFFIX`` (:func:`publish_file`, a Keras ``.h5``), the
    middle exactly mkstemp's random part; both plain file names."""
    if not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and "\x00" not in n
               and n not in (".", "..") for n in (tmp, name)):
        return False
    if tmp.startswith(f".{name}.") and tmp.endswith(".tmp"):
        return bool(_MKSTEMP_PART.fullmatch(tmp[len(name) + 2:-4]))
    stem, suffix = Path(name).stem, Path(name).suffix
    return (bool(suffix) and tmp.startswith(f".{stem}.") and tmp.endswith(suffix)
            and bool(_MKSTEMP_PART.fullmatch(tmp[len(stem) + 2:len(tmp) - len(suffix)])))


def _plain_name(name) -> bool:
    """``name`` is one plain file name (no folder part), and not the journal's own."""
    return (isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and "\x00" not in name
            and name not in (".", "..", JOURNAL))


def _write_journal(folder: Path, pairs: list[tuple[str, str]], removes: list[str] = ()) -> Path:
    """The journal of ``pairs`` (temporary, final name) and of the files the set ``removes`` (names) in
    ``folder``, complete and durable before it is named."""
    record = {"kind": _JOURNAL_KIND, "format": 1, "pid": os.getpid(), "renames": [list(p) for p in pairs]}
    if removes:
        record["removes"] = list(removes)
    data = dumps_json(record)
    journal = folder / JOURNAL
    fd, tmp = tempfile.mkstemp(prefix=f"{JOURNAL}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, journal)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return journal


def _commit(pending: dict[Path, str], retired: list[Path] = (), state: TogetherSet | None = None) -> None:
    """Rename a finished set's temporaries into place and remove its ``retired`` files: journal first (one per
    folder), renames, removals, then no journal. A set spanning folders is all old or all new per folder across a
    kill (every set lungedge writes today is in one folder). ``state`` is marked committed once every journal
    is written: from then on the set is completed, by this process or by the folder's next lock."""
    folders: dict[Path, tuple[list[tuple[str, str]], list[str]]] = {}
    for path, tmp in pending.items():
        if os.path.dirname(os.path.abspath(tmp)) == os.path.abspath(path.parent) and _ours(Path(tmp).name, path.name):
            folders.setdefault(path.parent, ([], []))[0].append((Path(tmp).name, path.name))
    for path in retired:
        if _plain_name(path.name):
            folders.setdefault(path.parent, ([], []))[1].append(path.name)
    journals: list[Path] = []
    items = list(pending.items())
    folder = path = None
    try:
        for folder, (pairs, removes) in folders.items():
            journals.append(_write_journal(folder, pairs, removes))
        if state is not None:
            state.committed, state.files = True, len(items)
        for index, (path, tmp) in enumerate(items):
            _renaming(index, tmp, path)
            os.replace(tmp, path)
        for path in retired:
            _remove(path)
    except OSError as exc:
        if state is not None:
            state.committed = False
        for j in journals:
            j.unlink(missing_ok=True)
        for tmp in pending.values():
            Path(tmp).unlink(missing_ok=True)
        raise write_error(folder / JOURNAL if len(journals) < len(folders) else path, exc) from None
    except BaseException:  # Ctrl-C, SystemExit
        if state is not None:  # (also for a stop between the last journal and the line that marks it)
            state.committed, state.files = len(journals) == len(folders), len(items)
        if len(journals) < len(folders):  # before the set was committed: it stays old
            for j in journals:
                j.unlink(missing_ok=True)
            for tmp in pending.values():
                Path(tmp).unlink(missing_ok=True)
        else:  # the journals commit the set: finish its renames rather than leave them to the next lock
            _finish(items, retired, journals)
        raise
    for j in journals:
        _fsync_dir(j.parent)
        j.unlink(missing_ok=True)


def _finish(items: list[tuple[Path, str]], retired: list[Path], journals: list[Path]) -> None:
    """The renames and removals of a committed set that an exception (Ctrl-C) stopped: the renames whose
    temporaries are still there. One that fails leaves the journals for :func:`roll_forward`, at the folder's
    next lock."""
    for path, tmp in items:
        if os.path.lexists(tmp):
            try:
                os.replace(tmp, path)
            except OSError:
                return
    for path in retired:
        _remove(path)
    for j in journals:
        _fsync_dir(j.parent)
        j.unlink(missing_ok=True)


def roll_forward(folder: str | os.PathLike, log: Callable[[str], None] | None = None) -> list[str]:
    """Complete a set a killed :func:`written_together` was renaming into ``folder``: the renames its journal
    lists whose temporaries are still there (a rename already done left none), then the journal goes. Call it
    holding the folder's lock (:class:`FolderLock` does). A journal that is damaged, or lists temporaries that
    are neither there nor renamed, renames nothing of the user's: only the journal (ours) goes, and ``log``
    gets one line. The files the journal lists for removal (the previous set's, which the new one does not
    have) go after the renames. Returns the names renamed."""
    folder = Path(folder)
    say = log or (lambda line: print(line, file=sys.stderr))
    for half in folder.glob(f"{glob_escape(JOURNAL)}.*.tmp"):  # a journal killed while it was written
        if _MKSTEMP_PART.fullmatch(half.name[len(JOURNAL) + 1:-4]):
            half.unlink(missing_ok=True)
    journal = folder / JOURNAL
    try:
        text = journal.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # none, or ``folder`` is no folder (its writer says so)
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise LungedgeError(f"cannot read {journal}, the list of a set of files being written there: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text)
        pairs = data["renames"] if isinstance(data, dict) and data.get("kind") == _JOURNAL_KIND else None
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and _ours(*p) for p in pairs):
            raise ValueError
        removes = data.get("removes", [])
        if not isinstance(removes, list) or not all(_plain_name(n) for n in removes):
            raise ValueError
    except (ValueError, TypeError):
        journal.unlink(missing_ok=True)
        say(f"note: {journal} is damaged (not the list of renames lungedge writes); removed it and left every "
            f"other file in {folder} as it was")
        return []
    done, lost = [], []
    for tmp, name in pairs:
        try:
            os.replace(folder / tmp, folder / name)
            done.append(name)
        except FileNotFoundError:
            if not (folder / name).exists():
                lost.append(name)
        except OSError as exc:
            raise write_error(folder / name, exc, "cannot complete the interrupted write of") from None
    for name in () if lost else removes:  # the previous set's files the new one does not have; kept when some of
        _remove(folder / name)            # the new set is gone (they stand in for it)
    _fsync_dir(folder)
    journal.unlink(missing_ok=True)
    _fsync_dir(folder)
    if lost:
        say(f"note: {journal} listed files whose new version is gone ({', '.join(lost)}); completed the others "
            f"({', '.join(done) or 'none'}) and removed the journal")
    return done


def settle(folder: str | os.PathLike) -> None:
    """Before reading files of ``folder`` (a run's checkpoints, an engine): complete a set a killed writer left
    half renamed there (:func:`roll_forward`, under the folder's lock). A folder being written right now
    is left to its writer, which completes its own set."""
    folder = Path(folder)
    if not (folder / JOURNAL).exists():
        return
    try:
        FolderLock(folder, f"{COMMAND} (completing an interrupted write)").acquire().release()
    except LockedError:
        pass
    except WriteError as exc:
        raise LungedgeError(f"{folder} holds a set of files whose writing was stopped half way ({JOURNAL}), "
                            f"and it cannot be completed here: {exc}") from None


def read_written(path: str | os.PathLike) -> bytes:
    """The bytes of ``path`` as written so far, also inside :func:`written_together`."""
    pending = getattr(_TOGETHER, "pending", None) or {}
    return Path(pending.get(Path(path), path)).read_bytes()


def atomic_write_png(path: str | os.PathLike, fig) -> Path:
    """A matplotlib figure as a PNG, written with :func:`atomic_write_bytes`; the figure is closed."""
    from io import BytesIO

    import matplotlib.pyplot as plt

    buf = BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str | os.PathLike, text: str, exclusive: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), exclusive)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON in ``path``; a file that cannot be read or parsed is one line naming it as ``what``
    ("a split manifest", "a run configuration")."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LungedgeError(f"{path} is not {what} (invalid JSON: {exc})") from None
    except OSError as exc:
        raise LungedgeError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def dumps_json(obj: Any) -> str:
    """Stable JSON text: the same object always gives the same bytes."""
    return json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, dumps_json(obj))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_MKSTEMP_PART = re.compile(r"[a-z0-9_]{8}")  # the random part tempfile.mkstemp puts in a name


def _published_temps(folder: Path, name: str) -> list[Path]:
    """The temporaries a writer of ``name`` through :func:`publish_file` leaves when killed: ``.<stem>.XXXXXXXX
    <suffix>`` (``.best.k3j_x9a2.h5`` for ``best.h5``, as :func:`lungedge.models.files.save_keras_checkpoint`
    names them), the middle exactly mkstemp's random part, so no other file of the folder matches."""
    stem, suffix = Path(name).stem, Path(name).suffix
    return [p for p in folder.glob(f".{glob_escape(stem)}.*{glob_escape(suffix)}")
            if _MKSTEMP_PART.fullmatch(p.name[len(stem) + 2:len(p.name) - len(suffix)])]


def clean_temp_files(folder: str | os.PathLike, names: Iterable[str] | None = None,
                     published: Iterable[str] = ()) -> list[str]:
    """Remove the ``.<name>.*.tmp`` files :func:`atomic_write_bytes` leaves when killed mid-write.

    Call it while holding the folder's lock (nobody else is writing then). ``names``: only the temporaries of
    these files (a folder the user shares with other files). ``published``: the names of files written by a
    library through :func:`publish_file` (``best.h5``), whose temporaries keep the file's suffix
    (``.best.XXXXXXXX.h5``): those are removed too. Returns the names removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    patterns = [".*.tmp"] if names is None else [f".{glob_escape(n)}.*.tmp" for n in names]
    found = [p for pattern in patterns for p in folder.glob(pattern)]
    found += [p for name in published for p in _published_temps(folder, name)]
    for p in found:
        try:
            p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    return removed


# -- names and paths that must stay inside their roots -------------------------------------------------

def safe_name(name: str, what: str) -> str:
    """``name`` if it is one plain path component (no ``/``, ``..``, absolute or empty name)."""
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name
            or not name.isprintable() or name.startswith("~")):  # a newline or a bidi override in a folder name
        raise LungedgeError(f"{what} must be a plain folder name (printable, no '/', '..' or absolute path), "
                            f"got {name!r}")
    return name


def relative_inside(rel: str) -> str | None:
    """Why ``rel`` (a manifest entry, POSIX separators) would leave its root, or None if it stays inside."""
    if not isinstance(rel, str) or not rel:
        return "empty path"
    if "\x00" in rel:
        return "NUL in path"
    p = PurePosixPath(rel)
    if p.is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive or rel.startswith("~"):
        return "absolute path"
    if ".." in p.parts or ".." in PureWindowsPath(rel).parts:
        return "'..' leaves the data root"
    return None


def contained(root: str | os.PathLike, rel: str, what: str = "path") -> Path:
    """``root / rel``, refusing an absolute ``rel`` or one that climbs out with ``..``."""
    why = relative_inside(rel)
    if why:
        raise LungedgeError(f"{what} {rel!r} is not inside {root}: {why}")
    return Path(root) / rel


# -- folder locks -----------------------------------------------------------------------------------------

def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _holder_text(info: dict) -> str:
    if not info:
        return "another process"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} ({info.get('command', '?')}, "
            f"since {info.get('since', '?')})")


def read_holder(folder: str | os.PathLike) -> dict:
    try:
        info = json.loads(lock_path(folder).read_text(encoding="utf-8") or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class FolderLock:
    """``with FolderLock(folder, "lungedge train"):`` -- only one writer of ``folder`` at a time.

    A second writer (another process, or another open in this one) gets a :class:`LockedError`
    that names the holder. ``reclaimed`` holds the dead holder's record when a lock left behind by
    a killed process was taken over.
    """

    def __init__(self, folder: str | os.PathLike, command: str | None = None):
        self.folder = Path(folder)
        self.path = lock_path(self.folder)
        self.command = command or COMMAND
        self.fd: int | None = None
        self.reclaimed: dict | None = None

    def acquire(self) -> "FolderLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.path.parent, exc, "cannot create") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise write_error(self.path, exc, "cannot lock (write)") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockedError(f"{self.folder} is being written by {_holder_text(read_holder(self.folder))}; "
                                  "wait for it to finish or stop it, then try again") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock: retry
                os.close(fd)
                continue
            old = os.read(fd, 4096)
            if old.strip():
                try:
                    self.reclaimed = json.loads(old)
                except ValueError:
                    self.reclaimed = {}
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
            self.fd = fd
            try:  # a set a killed writer left half renamed here is completed before anyone uses the folder
                roll_forward(self.folder)
            except BaseException:
                self.release()
                raise
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: the next writer starts afresh
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# -- folders several processes write at once (results/, a calibration set) ---------------------------------

# the lock of a folder that several writers share (inside it; gone again when its last writer leaves)
WRITERS_LOCK = ".lungedge-writers.lock"


def temp_of(tmp: str, final: Callable[[str], bool]) -> bool:
    """``tmp`` is the temporary :func:`atomic_write_bytes` makes for a file whose name ``final`` accepts:
    ``.NAME.XXXXXXXX.tmp``, the middle exactly mkstemp's random part (see :func:`_ours`)."""
    name = tmp[1:-len(".XXXXXXXX.tmp")] if len(tmp) > len("..XXXXXXXX.tmp") else ""
    return bool(name) and _ours(tmp, name) and final(name)


def _share_lock(folder: Path) -> tuple[int, bool] | None:
    """(descriptor, exclusive) of the writers' lock of ``folder``: exclusive when no other writer holds it,
    else shared. None where the lock cannot be had (a read-only folder, a file system without flock): the
    write goes on unlocked and says itself why it fails, if it does."""
    path = folder / WRITERS_LOCK
    for _ in range(100):  # another name in its place (a link) would fail every time: bounded
        try:  # read-only is enough for flock, also on a lock file another user made (0644)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                exclusive = True
            except BlockingIOError:  # another writer: share the lock with it (a cleaner holds it for an instant)
                fcntl.flock(fd, fcntl.LOCK_SH)
                exclusive = False
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except OSError:  # ENOLCK, or the file went between open and flock (FileNotFoundError)
            same = None
        except BaseException:  # Ctrl-C while waiting for a cleaner
            os.close(fd)
            raise
        if same:
            return fd, exclusive
        os.close(fd)
        if same is None and (path.exists() or not folder.is_dir()):
            return None
        # the last writer removed the file between our open and flock: a new one, again
    return None


@contextmanager
def shared_writers(folder: str | os.PathLike, leftover: Callable[[str], bool]) -> Iterator[list[str]]:
    """``with shared_writers(results, left):`` write files into ``folder`` through temporaries, beside other
    processes doing the same (two ``eval``/``bench`` into one ``results/``), and first remove what a writer
    killed there left (SIGKILL, OOM, power loss): the files whose name ``leftover`` accepts.

    Every writer holds a shared ``flock`` on :data:`WRITERS_LOCK` in the folder while its temporaries are
    there; the kernel drops it when its holder dies. Leftovers are removed only by a writer that gets the lock
    exclusively without waiting (no writer alive: every such temporary is a dead one's), never while another
    holds it; only plain files whose name ``leftover`` accepts (lungedge's own temporary names), so a user's
    file or folder stays. The last writer out removes the lock file. A folder where no lock can be taken
    (read-only) is written as before, unlocked and not tidied. Yields the names removed."""
    folder = Path(folder)
    removed: list[str] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        got = None  # the write names the problem
    else:
        got = _share_lock(folder)
    try:
        if got is not None and got[1]:
            removed = _remove_leftovers(folder, leftover)
            fcntl.flock(got[0], fcntl.LOCK_SH)  # let other writers in
        yield removed
    finally:
        if got is not None:
            try:
                fcntl.flock(got[0], fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last one out: the folder as it was
                os.unlink(folder / WRITERS_LOCK)
            except OSError:  # another writer is in (BlockingIOError), or the file cannot be removed
                pass
            finally:
                os.close(got[0])


def _remove_leftovers(folder: Path, leftover: Callable[[str], bool]) -> list[str]:
    """Remove the plain files of ``folder`` whose name ``leftover`` accepts (call it holding the folder's
    writers' lock exclusively); the names removed. One that cannot be removed stays."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry.name != WRITERS_LOCK and leftover(entry.name) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            pass
    return sorted(removed)


# -- staged folders -----------------------------------------------------------------------------------------

def _staging_dirs(final: Path, kind: str) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.{kind}-*")) if final.parent.is_dir() else []


def clean_stale(final: str | os.PathLike) -> list[str]:
    """Tidy what a killed :func:`staged_folder` left beside ``final`` (call it holding the lock).

    A half-written staging folder is removed; a previous set moved aside but not yet replaced
    (killed between the two renames) is moved back. Returns what was done, one line each.
    """
    final = Path(final)
    done = []
    for stage in _staging_dirs(final, "staging"):
        shutil.rmtree(stage, ignore_errors=True)
        done.append(f"removed the unfinished {stage.name}")
    for old in _staging_dirs(final, "old"):
        if not final.exists():
            os.rename(old, final)
            done.append(f"restored the previous set from {old.name}")
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name}")
    return done


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def replace_folder(stage: Path, final: Path) -> list[str]:
    """Move the finished ``stage`` to ``final``; the previous ``final`` stays until the new one is in place.
    Returns the files of the previous set that the new one does not have (now gone), sorted."""
    old, dropped = None, []
    if final.exists():
        dropped = sorted(_files_under(final) - _files_under(stage))
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dropped


@contextmanager
def staged_folder(final: str | os.PathLike, command: str | None = None,
                  check: Callable[[Path], None] | None = None, lock: bool = True, log=None) -> Iterator[Path]:
    """``with staged_folder(out) as stage:`` write every file into ``stage``; on success it becomes ``out``.

    While the block runs ``out`` is locked (:class:`FolderLock`); ``check(stage)`` runs before the move
    and may raise to refuse the set. On any failure or interrupt the stage is removed and ``out`` is
    left exactly as it was. The whole set is replaced: ``log`` gets a note naming the previous set's files
    that the new one lacks (e.g. the FP16/INT8 files after an FP32-only export).
    """
    final = Path(final)
    guard = FolderLock(final, command) if lock else None
    if guard:
        guard.acquire()
    try:
        clean_stale(final)
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
            os.chmod(stage, _DIR_MODE)  # mkdtemp makes 0700; the set gets the usual permissions
        except OSError as exc:
            raise write_error(final.parent, exc) from None
        try:
            yield stage
            if check is not None:
                check(stage)
            try:
                dropped = replace_folder(stage, final)
            except OSError as exc:
                raise write_error(final, exc, "cannot move the finished set into") from None
            if dropped and log:
                shown = ", ".join(dropped[:8]) + (f" and {len(dropped) - 8} more" if len(dropped) > 8 else "")
                log(f"note: {final} was replaced by the new set; removed {len(dropped)} "
                    f"file{'s' if len(dropped) > 1 else ''} of the previous set that it does not have: {shown}")
        except BaseException as exc:
            shutil.rmtree(stage, ignore_errors=True)
            note_kept(f"{final}: unchanged" if final.exists() else f"{final}: nothing written")
            if isinstance(exc, WriteError) and str(stage) in str(exc):  # name the file where it was going
                raise WriteError(str(exc).replace(str(stage), str(final))) from None
            raise
    finally:
        if guard:
            guard.release()


# -- the user's cache folder (logs of internal errors) -----------------------------------------------------

def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lungedge`` or ``~/.cache/lungedge``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lungedge"


def write_log(name: str, text: str) -> Path | None:
    """Write ``text`` to ``<cache>/logs/<UTC time>-<pid>-<name>.log`` (a temp folder if the cache is
    not writable); the path, or None when nothing could be written anywhere."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    fname = f"{stamp}-{os.getpid()}-{name}.log"
    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir()) / "lungedge-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / fname
            path.write_text(text, encoding="utf-8", errors="replace")
            return path
        except OSError:
            continue
    return None
