"""lungedge.io: atomic writes that fail in one line, folder locks, staged folders, names kept inside roots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import child_stopped_before, small_file_limit, unwritable_folder

from lungedge.errors import LungedgeError
from lungedge.io import (FolderLock, LockedError, WriteError, atomic_write_text, clean_stale, clean_temp_files,
                         contained, lock_path, safe_name, staged_folder, write_json)

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "b.json"
    write_json(p, {"x": 1})
    write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [q.name for q in p.parent.iterdir()] == ["b.json"]  # no temporary file left


def test_exclusive_write_never_replaces_a_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    atomic_write_text(p, "first\n", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_text(p, "second\n", exclusive=True)
    assert p.read_text() == "first\n" and [q.name for q in tmp_path.iterdir()] == ["rows.jsonl"]


def test_runs_finishing_in_the_same_second_keep_their_own_results(tmp_path):
    """Eight processes write their rows at the same moment: eight files, each whole and its own."""
    code = ("import sys, time\nfrom lungedge.results import write_rows\n"
            "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"
            f"print(write_rows([{{'run': int(sys.argv[2])}}] * 50, {str(tmp_path)!r}, 'bench'))\n")
    start = f"{time.time() + 3:.3f}"
    procs = [subprocess.Popen([sys.executable, "-c", code, start, str(i)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for i in range(8)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 8 and sorted(Path(o).name for o in outs) == sorted(q.name for q in tmp_path.iterdir())
    runs = set()
    for out in outs:
        rows = [json.loads(line) for line in Path(out).read_text().splitlines()]
        assert len(rows) == 50 and len({r["run"] for r in rows}) == 1
        runs.add(rows[0]["run"])
    assert runs == set(range(8))


def test_write_into_read_only_folder_is_one_line(tmp_path):
    ro = unwritable_folder(tmp_path)
    try:
        with pytest.raises(WriteError, match=rf"cannot write {ro}/x\.json: (Permission denied|Operation not permitted)"):
            atomic_write_text(ro / "x.json", "{}")
    finally:
        if ro.is_dir() and ro.parent == tmp_path:
            ro.chmod(0o755)


def test_write_to_existing_folder_is_one_line(tmp_path):
    with pytest.raises(WriteError, match="it is an existing folder"):
        atomic_write_text(tmp_path, "{}")


def test_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "rows.json"
    target.write_text("old")
    code = ("from lungedge.io import atomic_write_text, WriteError\n"
            f"try: atomic_write_text({str(target)!r}, 'x' * 100_000)\n"
            "except WriteError as e: print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          preexec_fn=small_file_limit(10_000))
    assert proc.stdout.strip() == f"cannot write {target}: File too large"
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "/abs", "", "~user", "a\\b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(LungedgeError, match="plain folder name"):
        safe_name(name, "--run-name")


def test_plain_name_is_kept():
    assert safe_name("run-1_s0", "--run-name") == "run-1_s0"


@pytest.mark.parametrize("rel", ["../x.png", "a/../../x.png", "/etc/passwd", "C:\\x.png", "~/x.png", ""])
def test_paths_leaving_the_root_are_refused(tmp_path, rel):
    with pytest.raises(LungedgeError, match="is not inside"):
        contained(tmp_path, rel, "manifest entry")


def test_contained_path_inside_root(tmp_path):
    assert contained(tmp_path, "cls/img 1.png") == tmp_path / "cls" / "img 1.png"


def test_lock_names_holder_and_refuses_second_writer(tmp_path):
    folder = tmp_path / "runs" / "m" / "r"
    with FolderLock(folder, "lungedge train"):
        info = json.loads(lock_path(folder).read_text())
        assert info["pid"] == os.getpid() and info["command"] == "lungedge train"
        with pytest.raises(LockedError, match=rf"is being written by pid {os.getpid()} on .*lungedge train"):
            FolderLock(folder, "lungedge train").acquire()
    assert not lock_path(folder).exists()
    with FolderLock(folder):  # free again once released
        pass


def _hold_lock_in_child(folder: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from lungedge.io import FolderLock
        FolderLock({str(folder)!r}, "lungedge export").acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_of_killed_process_is_reclaimed(tmp_path):
    folder = tmp_path / "engines" / "m"
    proc = _hold_lock_in_child(folder)
    try:
        with pytest.raises(LockedError, match=rf"pid {proc.pid} .*lungedge export"):
            FolderLock(folder).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_path(folder).exists()  # the dead holder's file is still there ...
    lock = FolderLock(folder).acquire()  # ... and taken over
    try:
        assert lock.reclaimed["pid"] == proc.pid
    finally:
        lock.release()


def test_staged_folder_replaces_the_set_whole(tmp_path):
    out = tmp_path / "engines" / "m"
    with staged_folder(out) as stage:
        (stage / "m.onnx").write_text("one")
        (stage / "m.fp16.onnx").write_text("one")
    assert sorted(p.name for p in out.iterdir()) == ["m.fp16.onnx", "m.onnx"]
    with staged_folder(out) as stage:
        (stage / "m.onnx").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"]  # nothing of the first set mixed in
    assert (out / "m.onnx").read_text() == "two"
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]  # no stage, old set or lock left


def test_replacing_a_set_names_the_files_it_removes(tmp_path):
    out, notes = tmp_path / "m", []
    with staged_folder(out, log=notes.append) as stage:
        for name in ("m.fp32.onnx", "m.fp16.onnx", "m.int8.onnx"):
            (stage / name).write_text("one")
    assert notes == []  # a first set removes nothing
    with staged_folder(out, log=notes.append) as stage:
        (stage / "m.fp32.onnx").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["m.fp32.onnx"]  # still swapped whole
    assert notes == [f"note: {out} was replaced by the new set; removed 2 files of the previous set that it does "
                     "not have: m.fp16.onnx, m.int8.onnx"]


def test_staged_folder_gets_the_mode_of_a_plain_mkdir(tmp_path):
    (tmp_path / "plain").mkdir()
    with staged_folder(tmp_path / "m") as stage:
        (stage / "m.onnx").write_text("one")
    assert (tmp_path / "m").stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkdtemp's 0700


def test_failed_or_refused_set_leaves_previous_one(tmp_path):
    out = tmp_path / "m"
    with staged_folder(out) as stage:
        (stage / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_folder(out) as stage:
            (stage / "a").write_text("new")
            raise RuntimeError("killed half-way")

    def refuse(stage):
        raise LungedgeError("parity failed")

    with pytest.raises(LungedgeError):
        with staged_folder(out, check=refuse) as stage:
            (stage / "a").write_text("new")
    assert (out / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_set_killed_mid_way_leaves_previous_set(tmp_path):
    out = tmp_path / "m"
    with staged_folder(out) as stage:
        (stage / "a").write_text("old")
    code = textwrap.dedent(f"""
        import time
        from lungedge.io import staged_folder
        with staged_folder({str(out)!r}) as stage:
            (stage / "a").write_text("new")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "a").read_text() == "old"
    litter = sorted(p.name for p in tmp_path.iterdir() if p.name != "m")
    assert any(".staging-" in n for n in litter)  # the killed writer's stage is still there ...
    with staged_folder(out) as stage:  # ... until the next writer tidies it
        (stage / "a").write_text("next")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (out / "a").read_text() == "next"


def test_set_moved_aside_but_not_replaced_is_restored(tmp_path):
    out = tmp_path / "m"
    aside = tmp_path / ".m.old-12345"
    aside.mkdir()
    (aside / "a").write_text("old")  # killed between the two renames: only the old set exists
    assert clean_stale(out) == ["restored the previous set from .m.old-12345"]
    assert (out / "a").read_text() == "old"


def test_temp_files_of_killed_keras_checkpoint_writes_are_cleaned_and_nothing_else(tmp_path):
    leftovers = [".best.k3j_x9a2.h5", ".last.00ab_zz9.h5"]  # save_keras_checkpoint's mkstemp names
    mine = ["best.h5", ".best.h5", ".best.mine.h5", ".best.k3j_x9a2.h5.bak", ".other.k3j_x9a2.h5", ".best.K3J_X9A2.h5",
            ".last.k3j_x9a2.keras", "notes.txt"]
    for name in leftovers + mine:
        (tmp_path / name).write_text("x")
    assert sorted(clean_temp_files(tmp_path, published=["best.h5", "last.h5"])) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mine)


def test_temp_files_of_killed_writes_are_cleaned(tmp_path):
    (tmp_path / ".last.pth.abc123.tmp").write_text("half")
    (tmp_path / "last.pth").write_text("whole")
    assert clean_temp_files(tmp_path) == [".last.pth.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


# -- a set killed between its renames: the journal rolls forward --------------------------------------------

def _write_set_killed(folder: Path, names, new: str, stop_before: int | None,
                      retired=()) -> subprocess.CompletedProcess:
    """In a child process, write ``names`` (text ``new``) as one written_together set that also retires the files
    ``retired``; ``stop_before``: the child is SIGKILLed right before that rename (the hook the renaming loop
    calls), the rest never renamed."""
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import lungedge.io as io

        def stop(index, tmp, path):
            if index == {stop_before!r}:
                os.kill(os.getpid(), signal.SIGKILL)

        io._renaming = stop
        with io.written_together():
            for name in {list(retired)!r}:
                io.retire(Path({str(folder)!r}) / name)
            for name in {list(names)!r}:
                io.atomic_write_text(Path({str(folder)!r}) / name, {new!r})
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_set_killed_between_its_renames_is_completed_by_the_next_lock_of_the_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    names = ["best.pth", "last.pth", "metrics.json"]
    for name in names:
        (run / name).write_text("old")
    (run / "notes.txt").write_text("mine")
    proc = _write_set_killed(run, names, "new", stop_before=1)
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # killed between the first and the second rename
    assert [(run / n).read_text() for n in names] == ["new", "old", "old"]  # half new, half old, as left
    assert (run / ".lungedge-publish.json").is_file()
    with FolderLock(run, "lungedge train"):  # what train, report, predict --explain and engine builds take
        assert [(run / n).read_text() for n in names] == ["new", "new", "new"]
    assert _names(run) == sorted(names + ["notes.txt"])  # no temporaries, no journal
    assert (run / "notes.txt").read_text() == "mine"


def test_a_file_a_library_wrote_gets_the_usual_mode_and_reaches_the_disk_before_its_name(tmp_path, monkeypatch):
    """Keras writes best.h5/last.h5 into mkstemp's file (mode 0600): the checkpoints were readable by their owner
    only, unlike every other file of the run, and never fsynced, so a crash after the epoch's journal and renames
    could leave last.h5 empty beside a metrics.json that counts its epoch."""
    import tempfile

    from lungedge.io import publish_file, written_together

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    fd, tmp = tempfile.mkstemp(prefix=".last.", suffix=".h5", dir=tmp_path)
    os.write(fd, b"weights")
    os.close(fd)
    with written_together():
        publish_file(tmp, tmp_path / "last.h5")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "last.h5").stat().st_mode & 0o777 == 0o666 & ~umask
    assert synced.index(tmp) < next(i for i, f in enumerate(synced) if ".lungedge-publish.json" in f)  # journal


def test_a_file_the_new_set_retires_goes_with_its_renames_also_across_a_kill(tmp_path):
    """A report that no longer draws a figure, an image now predicted as another class: the previous set's file
    goes when the new set takes its names, not before (a failed set keeps it) and not never (across a kill the
    journal lists it). A damaged journal's removals touch nothing."""
    from lungedge.io import retire, written_together

    run = tmp_path / "run"
    run.mkdir()
    for name in ("report.md", "old.png", "notes.txt"):
        (run / name).write_text("old")
    with pytest.raises(RuntimeError):
        with written_together():
            retire(run / "old.png")
            atomic_write_text(run / "report.md", "new")
            raise RuntimeError("failed half way")
    assert _names(run) == ["notes.txt", "old.png", "report.md"] and (run / "report.md").read_text() == "old"
    proc = _write_set_killed(run, ["report.md", "a.png"], "new", stop_before=1, retired=["old.png"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (run / "old.png").is_file() and (run / "report.md").read_text() == "new"  # killed half way
    with FolderLock(run, "lungedge report"):
        assert _names(run) == ["a.png", "notes.txt", "report.md"]
    (run / ".lungedge-publish.json").write_text(json.dumps(
        {"kind": "lungedge publish journal", "format": 1, "renames": [], "removes": ["notes.txt", "../x"]}))
    with FolderLock(run, "lungedge report"):
        assert _names(run) == ["a.png", "notes.txt", "report.md"]


def test_a_reader_leaves_a_set_being_renamed_to_its_writer(tmp_path):
    """A journal in a folder whose writer holds the lock is that writer's commit in progress: not touched."""
    from lungedge.io import settle

    run = tmp_path / "run"
    run.mkdir()
    (run / "a.txt").write_text("old")
    with FolderLock(run, "lungedge train"):
        (run / ".a.txt.abcd1234.tmp").write_text("new")
        (run / ".lungedge-publish.json").write_text(json.dumps(
            {"kind": "lungedge publish journal", "format": 1, "renames": [[".a.txt.abcd1234.tmp", "a.txt"]]}))
        settle(run)
        assert (run / "a.txt").read_text() == "old" and (run / ".lungedge-publish.json").is_file()
    settle(run)  # the writer gone (killed): the reader completes its set
    assert (run / "a.txt").read_text() == "new" and _names(run) == ["a.txt"]


def test_a_reader_alone_completes_the_set(tmp_path):
    from lungedge.io import settle

    run = tmp_path / "run"
    run.mkdir()
    names = ["a.txt", "b.txt"]
    for name in names:
        (run / name).write_text("old")
    assert _write_set_killed(run, names, "new", stop_before=1).returncode == -signal.SIGKILL
    settle(run)
    assert [(run / n).read_text() for n in names] == ["new", "new"]
    assert _names(run) == names
    assert not lock_path(run).exists()


def test_a_set_killed_before_its_journal_stays_old_and_its_temporaries_go(tmp_path):
    """Killed while the set's files were still being written (no journal yet): the old set stays whole; the
    writer's next lock of the folder leaves the temporaries for its own clean-up, which removes only those."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("a.txt", "b.txt"):
        (run / name).write_text("old")
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import lungedge.io as io
        with io.written_together():
            io.atomic_write_text(Path({str(run)!r}) / "a.txt", "new")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [(run / n).read_text() for n in ("a.txt", "b.txt")] == ["old", "old"]
    assert len(list(run.glob(".a.txt.*.tmp"))) == 1 and not (run / ".lungedge-publish.json").exists()
    with FolderLock(run):
        assert clean_temp_files(run, ["a.txt", "b.txt"])
    assert _names(run) == ["a.txt", "b.txt"]


@pytest.mark.parametrize("journal", [
    "{not json",
    json.dumps({"kind": "lungedge publish journal", "format": 1, "renames": [["notes.txt", "best.pth"]]}),
    json.dumps({"kind": "lungedge publish journal", "format": 1,
                "renames": [["../outside/.best.pth.abcd1234.tmp", "best.pth"]]}),
    json.dumps({"kind": "lungedge publish journal", "format": 1, "renames": [[".x.abcd1234.tmp", "best.pth"]]}),
    json.dumps(["something", "else"]),
])
def test_a_damaged_journal_renames_nothing_of_the_users_and_says_one_line(tmp_path, capsys, journal):
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    mine = {"best.pth": "mine", "notes.txt": "notes", ".x.abcd1234.tmp": "looks like a temporary"}
    for name, text in mine.items():
        (run / name).write_text(text)
    (outside / ".best.pth.abcd1234.tmp").write_text("elsewhere")
    (run / ".lungedge-publish.json").write_text(journal)
    with FolderLock(run, "lungedge report"):
        pass
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is damaged" in err and "Traceback" not in err, err
    assert {n: (run / n).read_text() for n in mine} == mine
    assert (outside / ".best.pth.abcd1234.tmp").read_text() == "elsewhere"
    assert _names(run) == sorted(mine)  # only the journal went
    with FolderLock(run):
        pass
    assert capsys.readouterr().err == ""  # said once


def test_a_journal_whose_new_files_are_gone_keeps_the_users_files_and_says_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth").write_text("old")
    (run / ".best.pth.abcd1234.tmp").write_text("new")
    (run / ".lungedge-publish.json").write_text(json.dumps(
        {"kind": "lungedge publish journal", "format": 1,
         "renames": [[".best.pth.abcd1234.tmp", "best.pth"], [".last.pth.zz_9x8y7.tmp", "last.pth"],
                     [".metrics.json.k3j_x9a2.tmp", "metrics.json"]]}))
    with FolderLock(run):
        pass
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "metrics.json" in err and "Traceback" not in err, err
    assert (run / "best.pth").read_text() == "new" and (run / "last.pth").read_text() == "old"
    assert _names(run) == ["best.pth", "last.pth"]


def test_a_half_written_journal_is_removed_and_the_old_set_stays(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "a.txt").write_text("old")
    (run / ".lungedge-publish.json.ab_c1234.tmp").write_text("{\"kind\": \"lung")
    (run / ".a.txt.abcd1234.tmp").write_text("new")
    with FolderLock(run):
        clean_temp_files(run, ["a.txt"])
    assert _names(run) == ["a.txt"] and (run / "a.txt").read_text() == "old"


def test_a_set_written_in_full_leaves_no_journal(tmp_path):
    from lungedge.io import written_together

    with written_together():
        atomic_write_text(tmp_path / "a.txt", "1")
        atomic_write_text(tmp_path / "b.txt", "2")
        assert not (tmp_path / "a.txt").exists()
    assert _names(tmp_path) == ["a.txt", "b.txt"]


@pytest.mark.parametrize("stop_at, expected", [("journal", "old"), ("rename", "new")])
def test_ctrl_c_during_a_commit_leaves_one_whole_set_and_no_temporaries(tmp_path, monkeypatch, stop_at, expected):
    """Ctrl-C while a set is being named: before its journal is complete the old set stays; once it is, the set
    is committed and the renames finish in the same process, so nothing waits for the folder's next lock."""
    import lungedge.io as io

    names = ["best.pth", "last.pth", "metrics.json"]
    for name in names:
        (tmp_path / name).write_text("old")

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    if stop_at == "journal":
        monkeypatch.setattr(io, "_write_journal", interrupt)
    else:
        monkeypatch.setattr(io, "_renaming", lambda index, tmp, path: interrupt() if index == 1 else None)
    with pytest.raises(KeyboardInterrupt):
        with io.written_together():
            for name in names:
                atomic_write_text(tmp_path / name, "new")
    assert [(tmp_path / n).read_text() for n in names] == [expected] * 3
    assert _names(tmp_path) == names  # no temporaries, no journal


# -- folders several writers share: results/ ---------------------------------------------------------------

def _write_rows_in_child(out: Path, then: str) -> subprocess.Popen:
    """A child writing its rows into ``out`` (lungedge.results.write_rows, as eval and bench do) that, once its
    temporary is complete, right before naming it: ``kill`` -- is SIGKILLed (kill -9, the OOM killer);
    ``wait`` -- says "stopped" and waits for a line on stdin before it goes on."""
    return child_stopped_before("link", then, f"""
        from lungedge.results import write_rows
        print(write_rows([{{"run": "child"}}], {str(out)!r}, "eval"), flush=True)
    """)


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_results_temporaries_a_killed_writer_left_go_with_the_next_write(tmp_path):
    from lungedge.results import write_rows

    out = tmp_path / "results"
    proc = _write_rows_in_child(out, "kill")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = _temporaries(out)
    assert len(left) == 1 and left[0].startswith(".eval-")  # what kill -9 leaves
    mine = write_rows([{"run": "next"}], out, "bench")
    assert sorted(p.name for p in out.iterdir()) == [mine.name]  # the dead writer's temporary and lock file: gone
    assert json.loads(mine.read_text()) == {"run": "next"}


def test_a_live_writers_temporary_stays_and_both_writers_finish(tmp_path):
    """Two writers into one results folder: the second, which finds the first's temporary there (and one that
    looks just like a dead writer's: it cannot tell them apart while another writer lives), removes neither."""
    from lungedge.io import WRITERS_LOCK
    from lungedge.results import write_rows

    out = tmp_path / "results"
    proc = _write_rows_in_child(out, "wait")
    try:
        assert proc.stdout.readline().strip() == "stopped"
        (out / ".bench-vm-20260101T000000Z.jsonl.abcd_123.tmp").write_text("a dead writer's, maybe\n")
        live = _temporaries(out)
        assert len(live) == 2
        mine = write_rows([{"run": "parent"}], out, "bench")
        assert _temporaries(out) == live and (out / WRITERS_LOCK).exists()  # still held by the child
        proc.stdin.write("go\n")
        proc.stdin.flush()
        theirs = Path(proc.communicate(timeout=60)[0].strip())
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert json.loads(mine.read_text()) == {"run": "parent"} and json.loads(theirs.read_text()) == {"run": "child"}
    assert not (out / WRITERS_LOCK).exists()  # the last writer out removed it
    write_rows([{"run": "later"}], out, "bench")
    assert _temporaries(out) == []  # no writer alive now: the dead one's goes with the next write


def test_only_lungedges_own_results_temporaries_are_removed(tmp_path):
    from lungedge.results import write_rows

    out = tmp_path / "results"
    out.mkdir()
    users = [".eval-notes.jsonl.tmp", ".bench-mine.jsonl.abcdefgh.tmp", "notes.tmp", ".notes.txt.abcdefgh.tmp",
             ".eval-vm-20261129T182344Z.jsonl.ABCDEFGH.tmp", ".eval-vm-20261129T182344Z.jsonl.abcdefgh.tmp.bak",
             ".eval-vm-20261129T182344Z.jsonl.abcdefghi.tmp", "eval-vm-20261129T182344Z.jsonl.abcdefgh.tmp"]
    for name in users:
        (out / name).write_text("mine\n")
    (out / ".eval-vm-20261129T182344Z.jsonl.abcdefgh.tmp").mkdir()  # a folder under a temporary's name
    (out / ".bench-vm-20261129T182344Z.jsonl.abcdefgh.tmp").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "elsewhere.txt").write_text("mine\n")
    (out / ".bench-vm-20261129T182344Z-2.jsonl.x_y_z_12.tmp").write_text("left by a killed bench\n")
    mine = write_rows([{"run": 1}], out, "eval")
    assert sorted(p.name for p in out.iterdir()) == sorted(users + [
        ".eval-vm-20261129T182344Z.jsonl.abcdefgh.tmp", ".bench-vm-20261129T182344Z.jsonl.abcdefgh.tmp", mine.name])
    assert all((out / name).read_text() == "mine\n" for name in users)
    assert (tmp_path / "elsewhere.txt").read_text() == "mine\n"


def test_a_writers_lock_that_cannot_be_taken_leaves_the_write_working(tmp_path):
    """A results folder whose lock cannot be taken (here a link to elsewhere under its name) is written unlocked,
    as before: the command works, nothing is created through the link, the leftover waits for a lockable day."""
    from lungedge.io import WRITERS_LOCK
    from lungedge.results import write_rows

    out = tmp_path / "results"
    out.mkdir()
    (out / WRITERS_LOCK).symlink_to(tmp_path / "not-there")
    (out / ".eval-vm-20261129T182344Z.jsonl.abcdefgh.tmp").write_text("left\n")
    mine = write_rows([{"run": 1}], out, "eval")
    assert json.loads(mine.read_text()) == {"run": 1}
    assert not (tmp_path / "not-there").exists() and (out / WRITERS_LOCK).is_symlink()
    assert _temporaries(out) == [".eval-vm-20261129T182344Z.jsonl.abcdefgh.tmp"]
