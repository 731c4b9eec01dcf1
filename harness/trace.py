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
            row.update(gpu_energy_j=j, energy_per_token_j=j / max(row["new_tokens"], 1), energy_estimated=True)
        self.flush_generations()

    @property
    def times_s(self) -> list[float]:
        return [row["time_s"] for row in self.generations]

    @property
    def new_tokens(self) -> int:
        return sum(row["new_tokens"] for row in self.generations)

    def flush_generations(self) -> None:
        _atomic_write_table(self._gen_path, self.generations, GENERATION_SCHEMA)


def read_table(run_dir: str | Path, table: str = GENERATIONS) -> pd.DataFrame:
    """One table of a run (``generations.parquet`` or ``steps.parquet``) as a DataFrame."""
    path = Path(run_dir) / table
    schema = GENERATION_SCHEMA if table == GENERATIONS else STEP_SCHEMA
    if not path.exists() or not any(path.glob("*.parquet")):
        return schema.empty_table().to_pandas()
    return pq.read_table(path, schema=schema).to_pandas()


def read_run_json(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {RUN_JSON})")
    return json.loads(path.read_text())


def drop_orphan_steps(run_dir: Path) -> None:
    """Remove step rows whose generation row was never written (a crash between writes)."""
    gens = read_table(run_dir, GENERATIONS)
    done = set(zip(gens.sweep, gens.decoder_label, gens.prompt_id, gens.repeat, strict=True))
    for part in sorted((Path(run_dir) / STEPS).glob("part-*.parquet")):
        steps = pq.read_table(part, schema=STEP_SCHEMA).to_pylist()
        kept = [s for s in steps if (s["sweep"], s["decoder_label"], s["prompt_id"], s["repeat"]) in done]
        if len(kept) != len(steps):
            _atomic_write_table(part, kept, STEP_SCHEMA)
