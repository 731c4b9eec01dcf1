"""Run directories: Parquet traces written as the run goes, read back with pandas.

Layout of a run directory::

    run.json                     resolved profile, environment, energy windows
    generations.parquet/         one row per generation (a Parquet dataset:
        part-<sweep>.parquet     one file per sweep attempt)
    steps.parquet/               one row per target verification step

Each part file is rewritten atomically (temporary file + rename) after every
generation, so a run killed at any point keeps every finished generation, and
readers never see half a file. ``pd.read_parquet(run / "generations.parquet")``
reads a whole table.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from decoders import StepRecord

GENERATIONS = "generations.parquet"
STEPS = "steps.parquet"
RUN_JSON = "run.json"

GENERATION_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("sweep", pa.string()),
        ("decoder_label", pa.string()),
        ("decoder", pa.string()),
        ("params_json", pa.string()),
        ("target_model", pa.string()),
        ("draft_model", pa.string()),
        ("device", pa.string()),
        ("dtype", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt_index", pa.int64()),
        ("repeat", pa.int64()),
        ("seed", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("new_tokens", pa.int64()),
        ("stopped_at_eos", pa.bool_()),
        ("time_s", pa.float64()),
        ("ttft_s", pa.float64()),
        ("tpot_s", pa.float64()),
        ("tokens_per_s", pa.float64()),
        ("iterations", pa.int64()),
        ("tokens_per_iteration", pa.float64()),
        ("mean_accepted", pa.float64()),
        ("drafted_tokens", pa.int64()),
        ("accepted_tokens", pa.int64()),
        ("drafted_by_position", pa.list_(pa.int64())),
        ("accepted_by_position", pa.list_(pa.int64())),
        ("target_forwards", pa.int64()),
        ("draft_forwards", pa.int64()),
        # The generation's time by phase (decoders.timing): draft, verify, accept/sample, other.
        ("draft_s", pa.float64()),
        ("verify_s", pa.float64()),
        ("accept_s", pa.float64()),
        ("other_s", pa.float64()),
        ("output_ppl", pa.float64()),
        ("passed", pa.bool_()),  # the profile's prompts.scorer verdict (null: no scorer, or not scored yet)
        ("score_detail", pa.string()),  # the scorer's reason, e.g. passed / failed / timeout
        ("gpu_energy_j", pa.float64()),
        ("energy_per_token_j", pa.float64()),
        ("energy_estimated", pa.bool_()),
        ("output_text", pa.string()),
        ("output_tokens", pa.list_(pa.int64())),
    ]
)

STEP_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("sweep", pa.string()),
        ("decoder_label", pa.string()),
        ("prompt_id", pa.string()),
        ("repeat", pa.int64()),
        ("step", pa.int64()),
        ("drafted", pa.int64()),
        ("accepted", pa.int64()),
        ("committed", pa.int64()),
    ]
)


def _umask_mode() -> int:
    # mkstemp creates 0600 files; give results the permissions a plain open() would.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.chmod(tmp, _umask_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode())


def _atomic_write_table(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Dot-prefixed temporary names are ignored by pyarrow's dataset reader.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SweepWriter:
    """Rows of one sweep attempt, flushed to their own part files after each generation."""

    def __init__(self, run_dir: Path, sweep: str) -> None:
        self.sweep = sweep
        self._gen_path = Path(run_dir) / GENERATIONS / f"part-{sweep}.parquet"
        self._step_path = Path(run_dir) / STEPS / f"part-{sweep}.parquet"
        self.generations: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []

    def add(self, generation: dict[str, Any], steps: Sequence[StepRecord]) -> None:
        """Write one generation's row and its steps (keyed like the row)."""
        key = {k: generation[k] for k in ("run_id", "sweep", "decoder_label", "prompt_id", "repeat")}
        # Steps first: a generation row is the commit mark, so a crash between the
        # two writes leaves orphan steps (dropped on resume), never a row without steps.
        self.steps.extend({**key, "step": j, **asdict(s)} for j, s in enumerate(steps))
        _atomic_write_table(self._step_path, self.steps, STEP_SCHEMA)
        self.generations.append(generation)
        self.flush_generations()

    def set_energy(self, joules: Sequence[float]) -> None:
        """Fill in each generation's (estimated) energy and rewrite the rows."""
        for row, j in zip(self.generations, joules, strict=True):
            with_energy(row, j)
        self.flush_generations()

    @property
    def times_s(self) -> list[float]:
        return [row["time_s"] for row in self.generations]

    @property
    def new_tokens(self) -> int:
        return sum(row["new_tokens"] for row in self.generations)

    def flush_generations(self) -> None:
        _atomic_write_table(self._gen_path, self.generations, GENERATION_SCHEMA)


JOURNAL = "journal"


def with_energy(row: dict[str, Any], joules: float | None) -> dict[str, Any]:
    """``row`` with its share of a sweep's measured energy (None: unmeasured)."""
    if joules is not None:
        row.update(gpu_energy_j=joules, energy_per_token_j=joules / max(row["new_tokens"], 1), energy_estimated=True)
    return row


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1)


class Journal:
    """Generations decoded but not yet scored and written, one JSON line each.

    A sweep's energy window holds decoding only: its generations are appended
    here as they finish (one small buffered write, no scoring, no Parquet), and
    become table rows after the window closes. A crash in between leaves the
    journal, and a resume turns its entries into rows instead of decoding them
    again (``entries``).
    """

    def __init__(self, run_dir: Path, name: str) -> None:
        self.path = Path(run_dir) / JOURNAL / f"{name}.jsonl"
        self._file = None

    def append(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = self.path.exists() and self.path.stat().st_size and _last_byte(self.path) != b"\n"
            self._file = self.path.open("a", encoding="utf-8")
            if torn:  # a crash mid-line: end that line, so this entry stays readable
                self._file.write("\n")
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()  # in the OS's hands: survives the process, costs no disk wait

    def entries(self) -> list[dict[str, Any]]:
        """What an earlier attempt journaled (a torn last line, from a crash mid-write, is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def remove(self) -> None:
        """Drop the journal once its generations are rows in the tables."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # a finished run keeps no empty journal folder
        except OSError:
            pass  # other sweeps' journals are still there, or it never existed


class CorruptRunError(ValueError):
    """A file of a run directory cannot be read; the message names it and what to do."""


def _read_part(part: Path, schema: pa.Schema) -> pa.Table:
    try:
        return pq.read_table(part, schema=schema)
    except (pa.ArrowException, OSError) as err:
        raise CorruptRunError(
            f"{part} is not a readable Parquet part ({err}); delete it and run harness profile with the same "
            "profile, -o and --set values plus --resume, which redoes its generations"
        ) from None


def read_table(run_dir: str | Path, table: str = GENERATIONS) -> pd.DataFrame:
    """One table of a run (``generations.parquet`` or ``steps.parquet``) as a DataFrame.

    Raises:
        CorruptRunError: a part file is damaged (named in the message).
    """
    path = Path(run_dir) / table
    schema = GENERATION_SCHEMA if table == GENERATIONS else STEP_SCHEMA
    # pyarrow's dataset reader skips names starting with "." or "_" (temporary files).
    parts = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not parts:
        return schema.empty_table().to_pandas()
    try:
        return pq.read_table(path, schema=schema).to_pandas()
    except (pa.ArrowException, OSError):
        # Find the damaged part; one read while a writer replaces a part may also
        # fail, and reads fine the second time.
        return pa.concat_tables([_read_part(p, schema) for p in parts]).to_pandas()


def check_tables(run_dir: str | Path) -> None:
    """Raise ``CorruptRunError`` unless both tables of ``run_dir`` read."""
    for table in (GENERATIONS, STEPS):
        read_table(run_dir, table)


def read_run_json(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of ``run_dir`` as a dict.

    Raises:
        FileNotFoundError: ``run_dir`` holds no run.json.
        CorruptRunError: run.json is not a JSON object (named in the message).
    """
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {RUN_JSON})")
    fix = "restore it from a copy, or run the profile again into a new directory (-o NEW_DIR)"
    try:
        data = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise CorruptRunError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise CorruptRunError(f"{path} must hold a JSON object, got {type(data).__name__}; {fix}")
    return data


def _step_key(s: dict[str, Any]) -> tuple:
    return s["sweep"], s["decoder_label"], s["prompt_id"], s["repeat"]


def drop_orphan_steps(run_dir: Path) -> None:
    """Remove step rows whose generation row was never written (a crash between writes)."""
    gens = read_table(run_dir, GENERATIONS)
    done = set(zip(gens.sweep, gens.decoder_label, gens.prompt_id, gens.repeat, strict=True))
    for part in sorted((Path(run_dir) / STEPS).glob("part-*.parquet")):
        steps = _read_part(part, STEP_SCHEMA).to_pylist()
        kept = [s for s in steps if _step_key(s) in done]
        if len(kept) != len(steps):
            _atomic_write_table(part, kept, STEP_SCHEMA)


def drop_generations_without_steps(run_dir: Path) -> int:
    """Remove generation rows whose step rows are not all there; return how many.

    The runner writes a generation's steps before its row, so this happens only
    when step parts were damaged or deleted; a resume then redoes those generations.
    """
    steps = read_table(run_dir, STEPS)
    counts = steps.groupby(["sweep", "decoder_label", "prompt_id", "repeat"]).size().to_dict()
    dropped = 0
    for part in sorted((Path(run_dir) / GENERATIONS).glob("part-*.parquet")):
        rows = _read_part(part, GENERATION_SCHEMA).to_pylist()
        kept = [r for r in rows if counts.get(_step_key(r), 0) == r["iterations"]]
        dropped += len(rows) - len(kept)
        if not kept and rows:
            part.unlink()  # the redo gets this sweep's name again
        elif len(kept) != len(rows):
            _atomic_write_table(part, kept, GENERATION_SCHEMA)
    return dropped


def prepare_resume(run_dir: Path) -> int:
    """Make a run directory's tables consistent before a resume; return generations to redo.

    Drops generation rows missing step rows (they are redone), then step rows
    without a generation row (a crash between the two writes).
    """
    dropped = drop_generations_without_steps(run_dir)
    drop_orphan_steps(run_dir)
    return dropped
