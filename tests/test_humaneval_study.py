"""benchmarks/humaneval_study.py on a run with known verdicts."""

from __future__ import annotations

import importlib.util
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness import trace
from tests.test_profile import ROOT

_spec = importlib.util.spec_from_file_location("humaneval_study", ROOT / "benchmarks" / "humaneval_study.py")
humaneval_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(humaneval_study)

N = 20


def _rows(label, decoder, temperature, passed, tokens=None):
    return [{"run_id": "r", "sweep": label, "decoder_label": label, "decoder": decoder,
             "params_json": json.dumps({"temperature": temperature}), "prompt_id": f"HumanEval/{i}",
             "prompt_index": i, "repeat": 0, "new_tokens": 10, "time_s": 0.5, "target_forwards": 4 if
             decoder != "sampling" else 10, "output_ppl": 1.5 + 0.01 * i, "stopped_at_eos": True,
             "passed": passed[i], "score_detail": "passed" if passed[i] else "failed",
             "output_tokens": (tokens or [[i]] * N)[i]} for i in range(N)]


@pytest.fixture
def run_dir(tmp_path):
    base = [i % 2 == 0 for i in range(N)]  # 10 of 20
    mtad = [p or i in (1, 3, 5, 7, 9) for i, p in enumerate(base)]  # 5 more, none lost
    greedy = [i < 14 for i in range(N)]
    rows = (_rows("sampling", "sampling", 1.0, base) + _rows("mtad", "mtad", 1.0, mtad)
            + _rows("sampling-greedy", "sampling", 0.0, greedy) + _rows("specdecode-greedy", "specdecode", 0.0, greedy))
    (tmp_path / trace.GENERATIONS).mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=trace.GENERATION_SCHEMA),
                   tmp_path / trace.GENERATIONS / "part-00.parquet")
    trace.atomic_write_json(tmp_path / trace.RUN_JSON, {"profile": {"name": "t"}, "energy_windows": [
        {"decoder_label": "sampling", "total_energy_j": 50.0, "new_tokens": 200}]})
    return tmp_path


def test_study_figures_and_tests(run_dir):
    r = humaneval_study.study(run_dir)
    assert r["problems"] == N
    d = r["decoders"]
    assert d["sampling"]["pass_at_1"]["value"] == 0.5 and d["mtad"]["pass_at_1"]["value"] == 0.75
    lo, hi = d["sampling"]["pass_at_1"]["ci95"]
    assert lo == pytest.approx(0.299, abs=1e-3) and hi == pytest.approx(0.701, abs=1e-3)  # Wilson, 10 of 20
    assert d["sampling"]["j_per_token_measured"] == 0.25 and d["mtad"]["j_per_token_measured"] is None
    assert d["mtad"]["tokens_per_target_call"]["value"] == 2.5 and d["sampling"]["tokens_per_s"]["value"] == 20.0
    assert r["greedy_check"]["same_passes"] and r["greedy_check"]["problems_with_other_tokens"] == []
    c = r["against_sampling"]["mtad"]
    assert c["mcnemar"] == {"only_baseline_passes": 0, "only_this_passes": 5, "exact_p": pytest.approx(0.0625)}
    assert c["pass_at_1_difference"]["value"] == pytest.approx(0.25)
    assert c["ppl_ratio_to_baseline"]["value"] == pytest.approx(1.0)
    assert set(r["against_sampling"]) == {"mtad"}  # greedy settings are not compared with sampled sampling


def test_greedy_check_names_the_problems_that_differ(run_dir):
    part = run_dir / trace.GENERATIONS / "part-00.parquet"
    rows = pq.read_table(part, schema=trace.GENERATION_SCHEMA).to_pylist()
    for row in rows:
        if row["decoder_label"] == "specdecode-greedy" and row["prompt_id"] == "HumanEval/3":
            row["passed"], row["output_tokens"] = False, [99]
    pq.write_table(pa.Table.from_pylist(rows, schema=trace.GENERATION_SCHEMA), part)
    g = humaneval_study.study(run_dir)["greedy_check"]
    assert not g["same_passes"] and g["problems_with_other_verdicts"] == ["HumanEval/3"]
    assert g["problems_with_other_tokens"] == ["HumanEval/3"]
