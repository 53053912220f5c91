"""Result rows of bench and eval: their common fields and the one writer (JSON lines under ``results/``)."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

from . import provenance
from .io import atomic_write_text, sha256_file, shared_writers, temp_of

FORMAT = "lungedge-result/1"
# the name of a results file write_rows makes: bench-<host>-<UTC time>[-n].jsonl
RESULT_NAME = re.compile(r"(bench|eval)-[^/]+-[0-9]{8}T[0-9]{6}Z(-[0-9]+)?\.jsonl")


def left_by_writer(name: str) -> bool:
    """``name`` is the temporary of a results file (``.eval-vm-20261129T182344Z.jsonl.s3w2rp5w.tmp``), the
    only thing of a folder of results that a writer killed there leaves; nothing else in it is ours."""
    return temp_of(name, RESULT_NAME.fullmatch)


def job_row(kind: str, job, runner) -> dict:
    """The fields every row has: what ran (model, backend, device, precision, file), where it came from and,
    where the runner says, how its runtime was set up (``runtime``: e.g. the precision OpenVINO computed in)."""
    row = {"format": FORMAT, "kind": kind, "model": job.model, "backend": runner.backend,
           "source_framework": runner.info.framework, "device": runner.device, "precision": job.precision,
           "variant": runner.variant, "artifact": str(job.artifact), "artifact_sha256": sha256_file(job.artifact),
           "source_sha256": runner.info.source_sha256}
    facts = runner.runtime_facts()
    if facts:
        row["runtime"] = facts
    return row


def write_rows(rows: list[dict], out, kind: str) -> Path:
    """results/<kind>-<host>-<UTC time>.jsonl (one JSON object a line); never overwrites, not even
    the file of another run that finishes in the same second (the name is taken atomically). Several runs
    may write into ``out`` at once; the temporaries a killed one left there are removed
    (:func:`lungedge.io.shared_writers`)."""
    host = provenance.slug_host()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    with shared_writers(out, left_by_writer):  # another eval or bench may write here too; a killed one's go
        for n in itertools.count(1):
            path = Path(out) / f"{kind}-{host}-{stamp}{'' if n == 1 else f'-{n}'}.jsonl"
            try:
                return atomic_write_text(path, text, exclusive=True)
            except FileExistsError:
                continue
