"""``harness profile``: validation, traces, resume after a kill, energy accounting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness import trace
from harness.profile_spec import ProfileError, load_profile, parse_profile
from harness.runner import run_profile

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "profiles" / "smoke.yaml"


def harness_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke profile through the real CLI, as CI and users run it."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    proc = harness_cli("profile", str(SMOKE), "-o", str(run_dir), "--no-progress")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return run_dir, out


def test_smoke_traces_schema_and_counts(smoke_run):
    run_dir, stdout = smoke_run
    profile = load_profile(SMOKE)
    gens = pd.read_parquet(run_dir / "generations.parquet")
    steps = pd.read_parquet(run_dir / "steps.parquet")
    n_prompts = len(profile.prompts.items)
    assert len(gens) == len(profile.decoders) * n_prompts * profile.generation.repeats
    assert list(gens.columns) == trace.GENERATION_SCHEMA.names
    assert not gens.duplicated(["decoder_label", "prompt_id", "repeat"]).any()
    assert len(steps) == gens.iterations.sum()
    # Every step row belongs to a generation and adds up to its token count.
    committed = steps.groupby(["decoder_label", "prompt_id", "repeat"]).committed.sum()
    joined = gens.set_index(["decoder_label", "prompt_id", "repeat"]).new_tokens
    assert committed.sort_index().equals(joined.sort_index())
    assert (gens.new_tokens <= profile.generation.max_new_tokens).all()
    assert (gens.time_s > 0).all() and (gens.ttft_s > 0).all() and (gens.ttft_s <= gens.time_s).all()
    assert (gens.output_ppl > 1).all()
    assert gens.gpu_energy_j.isna().all() and gens.energy_estimated.isna().all()  # no --energy
    sd = gens[gens.decoder == "specdecode"]
    assert (sd.accepted_by_position.map(len) == 4).all()
    assert (sd.accepted_tokens == sd.accepted_by_position.map(sum)).all()
    assert (gens[gens.decoder == "sampling"].tokens_per_iteration == 1.0).all()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["ended"]
    assert info["profile"]["decoders"][1]["name"] == "specdecode"
    assert info["environment"]["packages"]["torch"]
    assert "mtad" in stdout and "speedup" in stdout


def test_same_seed_pairs_prompts_across_decoders(smoke_run):
    gens = pd.read_parquet(smoke_run[0] / "generations.parquet")
    seeds = gens.groupby(["prompt_id", "repeat"]).seed.nunique()
    assert (seeds == 1).all()
    assert gens.seed.nunique() == len(seeds)


def _rows_by_key(run_dir: Path) -> dict:
    gens = pd.read_parquet(run_dir / "generations.parquet")
    return {(r.decoder_label, r.prompt_id, r.repeat): list(r.output_tokens) for r in gens.itertuples()}


def _rows_now(part) -> int:
    """Rows of a part file the run is still rewriting (0 when caught mid-replace)."""
    try:
        return len(pd.read_parquet(part))
    except OSError:
        # The writer replaces the file atomically, but pyarrow sizes the path before
        # opening it; a replace in between reads as a short file. The next poll sees
        # the new one.
        return 0


@pytest.mark.slow
def test_resume_after_kill_completes_without_loss_or_duplicates(smoke_run, tmp_path):
    run_dir = tmp_path / "killed"
    proc = harness_cli("profile", str(SMOKE), "-o", str(run_dir), "--no-progress",
                       "--set", "generation.max_new_tokens=64", start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once the second sweep has written rows
        parts = list((run_dir / "generations.parquet").glob("part-01-*.parquet"))
        if parts and _rows_now(parts[0]) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _rows_by_key(run_dir)
    assert 8 <= len(partial) < 24, "the kill should land mid-run"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"

    again = harness_cli("profile", str(SMOKE), "-o", str(run_dir), "--no-progress")
    assert again.wait(timeout=60) == 2, "an existing run must not be overwritten without --resume"
    assert "--resume" in again.stderr.read()

    resumed = harness_cli("profile", str(SMOKE), "-o", str(run_dir), "--no-progress", "--resume",
                          "--set", "generation.max_new_tokens=64")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    gens = pd.read_parquet(run_dir / "generations.parquet")
    assert len(gens) == 24 and not gens.duplicated(["decoder_label", "prompt_id", "repeat"]).any()
    steps = pd.read_parquet(run_dir / "steps.parquet")
    assert len(steps) == gens.iterations.sum()
    final = _rows_by_key(run_dir)
    assert all(final[k] == v for k, v in partial.items()), "rows written before the kill must survive unchanged"
    # Seeds are per (prompt, repeat), so a resumed run equals an uninterrupted one.
    fresh = tmp_path / "fresh"
    run_profile(load_profile(SMOKE, ["generation.max_new_tokens=64"]), fresh, show_progress=False)
    assert _rows_by_key(fresh) == final
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_resume_refuses_a_changed_profile(smoke_run):
    proc = harness_cli("profile", str(SMOKE), "-o", str(smoke_run[0]), "--resume",
                       "--set", "generation.repeats=3")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "different profile" in err


BAD = {
    "name": "bad",
    "modelz": {},
    "models": {"target": "builtin:tiny-random", "dtype": "float8", "device": "cpu"},
    "prompts": {"items": ["hi"], "chat_template": "yes"},
    "generation": {"max_new_tokens": 0, "repeats": "two", "sed": 1},
    "decoders": [
        {"name": "specdecod"},
        {"name": "mtad", "params": {"gamma": 0, "beam_width": 2.5, "accept_thres": -1, "foo": 1}},
        {"name": "sampling", "params": {"top_p": 1.5}},
        {"name": "sampling", "params": {}},
    ],
}


def test_invalid_profile_reports_every_problem_with_its_path():
    with pytest.raises(ProfileError) as info:
        parse_profile(BAD, "bad.yaml")
    problems = "\n".join(info.value.problems)
    for expected in [
        "modelz: unknown key",
        "models.dtype: must be one of",
        "prompts.chat_template: must be bool",
        "generation.max_new_tokens: must be >= 1",
        "generation.repeats: must be int",
        "generation.sed: unknown key",
        "decoders[0].name: unknown decoder 'specdecod'",
        "Did you mean 'specdecode'",
        "decoders[1].params.gamma: gamma must be >= 1",
        "decoders[1].params.beam_width: beam_width must be an int",
        "decoders[1].params.accept_thres: accept_thres must be > 0",
        "decoders[1].params.foo: mtad takes no such parameter",
        "decoders[2].params.top_p: top_p must be in (0, 1]",
        "decoders[3].label: 'sampling' is used twice",
        "models.draft: required by decoder(s) mtad",
    ]:
        assert expected in problems, f"missing: {expected}\n{problems}"


def test_invalid_profile_via_cli_writes_nothing(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(BAD))
    proc = harness_cli("profile", str(path), "-o", str(tmp_path / "run"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "decoders[1].params.gamma" in err and "generation.repeats" in err
    assert not (tmp_path / "run").exists()


def test_set_overrides_and_list_indices():
    profile = load_profile(SMOKE, ["generation.max_new_tokens=8", "decoders.1.params.gamma=2",
                                   "decoders.2.label=mtad-b2", "generation.compile_model=true"])
    assert profile.generation.max_new_tokens == 8
    assert profile.generation.compile_model is True and profile.generation.cuda_graphs is True
    assert profile.decoders[1].params["gamma"] == 2 and profile.decoders[2].label == "mtad-b2"
    with pytest.raises(ProfileError, match="expected key=value"):
        load_profile(SMOKE, ["generation.max_new_tokens"])


def test_prompts_from_jsonl_with_ids(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "q": "Hello"}\n\n{"id": "b", "q": "World"}\n')
    raw = yaml.safe_load(SMOKE.read_text())
    raw["prompts"] = {"file": "p.jsonl", "field": "q", "id_field": "id"}
    raw["decoders"] = [{"name": "sampling"}]
    raw["generation"] = {"max_new_tokens": 4, "repeats": 1, "warmup": 0}
    run_dir = run_profile(parse_profile(raw, "p.yaml", base_dir=str(tmp_path)), tmp_path / "run", show_progress=False)
    gens = pd.read_parquet(run_dir / "generations.parquet")
    assert sorted(gens.prompt_id) == ["a", "b"]


def test_energy_on_a_machine_without_gpu_stops_before_running(tmp_path):
    proc = harness_cli("profile", str(SMOKE), "--energy", "-o", str(tmp_path / "run"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "--energy" in err and "cuda" in err.lower()
    assert not (tmp_path / "run").exists()


def test_execution_settings_must_be_booleans():
    raw = yaml.safe_load(SMOKE.read_text())
    raw["generation"].update(cuda_graphs="yes", compile_model=1)
    with pytest.raises(ProfileError) as info:
        parse_profile(raw, "p.yaml")
    problems = "\n".join(info.value.problems)
    assert "generation.cuda_graphs: must be bool" in problems
    assert "generation.compile_model: must be bool" in problems


def test_a_decoder_can_bring_its_own_draft(tmp_path, tiny_dirs):
    """eagle runs with its own head beside specdecode with the profile's draft, in one run."""
    from decoders.eagle import EagleHead
    from harness.eagle_head import save_eagle_head
    from harness.models import load_model

    target_dir, draft_dir = tiny_dirs
    head_dir = tmp_path / "head"
    save_eagle_head(head_dir, EagleHead.for_target(load_model(str(target_dir), dtype="float32", device="cpu")),
                    "the tiny target")
    raw = {
        "name": "own-draft",
        "models": {"target": str(target_dir), "draft": str(draft_dir), "dtype": "float32", "device": "cpu"},
        "prompts": {"items": ["Once upon a time", "The quick brown fox"], "chat_template": False},
        "generation": {"max_new_tokens": 12, "repeats": 1, "warmup": 0, "seed": 0},
        "decoders": [{"name": "specdecode", "params": {"gamma": 2}},
                     {"name": "eagle", "draft": str(head_dir), "params": {"gamma": 3, "temperature": 0.0}},
                     {"name": "sampling", "params": {"temperature": 0.0}}],
    }
    profile = parse_profile(raw, "own-draft.yaml")
    assert profile.draft_specs() == [str(draft_dir), str(head_dir)]
    run_dir = run_profile(profile, tmp_path / "run", show_progress=False)
    table = trace.read_table(run_dir)
    drafts = table.groupby("decoder_label")["draft_model"].first().to_dict()
    assert drafts["eagle"] == str(head_dir) and drafts["specdecode"] == str(draft_dir)
    greedy = table.set_index(["decoder_label", "prompt_id"])["output_tokens"]
    for pid in table.prompt_id.unique():  # eagle at T=0 is greedy sampling
        assert list(greedy["eagle", pid]) == list(greedy["sampling", pid])
    recorded = json.loads((run_dir / "run.json").read_text())["profile"]["decoders"]
    assert recorded[1]["draft"] == str(head_dir) and "draft" not in recorded[0]


def test_own_draft_validation():
    base = yaml.safe_load(SMOKE.read_text())
    raw = {**base, "decoders": [{"name": "sampling", "draft": "builtin:tiny-random-draft"},
                                {"name": "eagle", "draft": 3}]}
    with pytest.raises(ProfileError) as info:
        parse_profile(raw, "x.yaml")
    problems = "\n".join(info.value.problems)
    assert "decoders[0].draft: sampling takes no draft model" in problems
    assert "decoders[1].draft: must be a model spec" in problems
    no_draft = {**base, "models": {**base["models"], "draft": None}, "decoders": [{"name": "eagle"}]}
    with pytest.raises(ProfileError, match=r"models.draft: required by decoder\(s\) eagle"):
        parse_profile(no_draft, "y.yaml")
    own = {**base, "models": {**base["models"], "draft": None}, "decoders": [{"name": "eagle", "draft": "h"}]}
    assert parse_profile(own, "z.yaml").draft_specs() == ["h"]


def test_a_wrong_draft_for_a_decoder_stops_before_any_sweep(tmp_path, tiny_dirs):
    target_dir, draft_dir = tiny_dirs
    raw = {
        "name": "wrong-draft",
        "models": {"target": str(target_dir), "draft": str(draft_dir), "dtype": "float32", "device": "cpu"},
        "prompts": {"items": ["Once upon a time"], "chat_template": False},
        "generation": {"max_new_tokens": 4, "repeats": 1, "warmup": 0, "seed": 0},
        "decoders": [{"name": "sampling"}, {"name": "eagle"}],  # eagle would take the plain draft model
    }
    with pytest.raises(ValueError, match="needs an EAGLE head"):
        run_profile(parse_profile(raw, "wrong-draft.yaml"), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "generations.parquet").exists()  # sampling did not run first


def test_warm_up_runs_on_the_longest_prompt(tmp_path, tiny_dirs, monkeypatch):
    """The warm-up builds the cache every cell of the sweep fits in (no cache, and no
    compilation, is left for the energy window): it decodes the longest prompt."""
    from decoders.base import Decoder

    fed = []
    generate = Decoder.generate

    def recording(self, input_ids, *args, **kwargs):
        fed.append(input_ids.shape[-1])
        return generate(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Decoder, "generate", recording)
    target_dir, _ = tiny_dirs
    items = ["Hi", "Once upon a time in a land far away there lived", "The fox"]
    raw = {
        "name": "warm-up",
        "models": {"target": str(target_dir), "dtype": "float32", "device": "cpu"},
        "prompts": {"items": items, "chat_template": False},
        "generation": {"max_new_tokens": 3, "repeats": 1, "warmup": 2, "seed": 0},
        "decoders": [{"name": "sampling"}],
    }
    run_dir = run_profile(parse_profile(raw, "warm-up.yaml"), tmp_path / "run", show_progress=False)
    lengths = trace.read_table(run_dir).sort_values("prompt_index").prompt_tokens.tolist()
    assert len(set(lengths)) == 3 and fed[2:] == lengths  # the three cells, in order
    assert fed[:2] == [max(lengths)] * 2  # both warm-up runs on the longest


def _rounds_profile(target_dir, draft_dir, rounds, repeats: int = 3, items=("Once upon a time", "The fox")) -> dict:
    return {
        "name": "rounds",
        "models": {"target": str(target_dir), "draft": str(draft_dir), "dtype": "float32", "device": "cpu"},
        "prompts": {"items": list(items), "chat_template": False},
        "generation": {"max_new_tokens": 6, "repeats": repeats, "warmup": 0, "seed": 0, "rounds": rounds},
        "decoders": [{"name": "sampling"}, {"name": "specdecode", "params": {"gamma": 2}}],
    }


def test_rounds_alternate_the_decoders_and_decode_the_same_rows(tmp_path, tiny_dirs, monkeypatch):
    """With as many rounds as repeats, repeat r of every decoder is round r, the decoders' order
    reversed every other round; each (decoder, round) is a sweep of its own, and every row equals
    the row the same (decoder, prompt, repeat) gets in one sweep per decoder (its seed is the same)."""
    from decoders.base import Decoder

    ran = []
    generate = Decoder.generate

    def recording(self, *args, **kwargs):
        ran.append(self.name)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "generate", recording)
    target_dir, draft_dir = tiny_dirs
    in_rounds = run_profile(parse_profile(_rounds_profile(target_dir, draft_dir, 3), "r.yaml"),
                            tmp_path / "in-rounds", show_progress=False)
    two = ["sampling"] * 2, ["specdecode"] * 2  # two prompts a sweep
    assert ran == [*two[0], *two[1], *two[1], *two[0], *two[0], *two[1]]
    gens = trace.read_table(in_rounds)
    assert sorted(set(gens.sweep)) == sorted(f"{k:02d}-{label}-round{r}-a0" for k, label in enumerate(
        ("sampling", "specdecode")) for r in range(3))
    assert (gens.sweep.str.extract(r"round(\d)")[0].astype(int) == gens.repeat).all()
    ran.clear()
    plain = run_profile(parse_profile(_rounds_profile(target_dir, draft_dir, 1), "r.yaml"),
                        tmp_path / "plain", show_progress=False)
    assert ran == ["sampling"] * 6 + ["specdecode"] * 6
    assert _rows_by_key(in_rounds) == _rows_by_key(plain)


def test_an_interrupted_run_in_rounds_resumes_round_by_round(tmp_path, tiny_dirs, monkeypatch):
    from decoders.base import Decoder

    target_dir, draft_dir = tiny_dirs
    profile = parse_profile(_rounds_profile(target_dir, draft_dir, 3), "r.yaml")
    generate, calls = Decoder.generate, []

    def failing(self, *args, **kwargs):  # the eighth generation fails: round 1's second sweep, its second cell
        calls.append(self.name)
        if len(calls) == 8:
            raise RuntimeError("killed")
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "generate", failing)
    with pytest.raises(RuntimeError, match="killed"):
        run_profile(profile, tmp_path / "run", show_progress=False)
    partial = _rows_by_key(tmp_path / "run")
    assert len(partial) == 6  # rounds 0 and round 1's first sweep (specdecode, the order reversed)
    assert {key[0] for key in partial if key[2] == 1} == {"specdecode"}
    monkeypatch.setattr(Decoder, "generate", generate)
    run_profile(profile, tmp_path / "run", resume=True, show_progress=False)
    gens = trace.read_table(tmp_path / "run")
    assert len(gens) == 12 and not gens.duplicated(["decoder_label", "prompt_id", "repeat"]).any()
    # The cell the interrupted sweep journaled is recovered under its name; the other runs in a
    # new attempt of the same (decoder, round).
    resumed = gens[(gens.decoder_label == "sampling") & (gens.repeat == 1)]
    assert sorted(resumed.sweep) == ["00-sampling-round1-a0", "00-sampling-round1-a0-recovered"]
    final = _rows_by_key(tmp_path / "run")
    assert all(final[k] == v for k, v in partial.items())
    fresh = run_profile(profile, tmp_path / "fresh", show_progress=False)
    assert _rows_by_key(fresh) == final


def test_with_one_repeat_the_prompts_are_dealt_out_to_the_rounds(tmp_path, tiny_dirs):
    target_dir, draft_dir = tiny_dirs
    items = ("Once upon a time", "The fox", "A cat sat", "In the year")
    run = run_profile(parse_profile(_rounds_profile(target_dir, draft_dir, 2, repeats=1, items=items), "r.yaml"),
                      tmp_path / "run", show_progress=False)
    gens = trace.read_table(run)
    by_sweep = gens.groupby("sweep").prompt_index.apply(sorted).to_dict()
    assert by_sweep == {"00-sampling-round0-a0": [0, 2], "01-specdecode-round0-a0": [0, 2],
                        "00-sampling-round1-a0": [1, 3], "01-specdecode-round1-a0": [1, 3]}


def test_rounds_are_validated_and_keep_older_fingerprints(tiny_dirs):
    target_dir, draft_dir = tiny_dirs
    raw = _rounds_profile(target_dir, draft_dir, 1)
    one = parse_profile(raw, "r.yaml")
    del raw["generation"]["rounds"]
    assert parse_profile(raw, "r.yaml").fingerprint() == one.fingerprint()  # absent when 1
    three = parse_profile(_rounds_profile(target_dir, draft_dir, 3), "r.yaml")
    assert three.fingerprint() != one.fingerprint() and three.to_dict()["generation"]["rounds"] == 3
    with pytest.raises(ProfileError, match=r"generation.rounds: must be int"):
        parse_profile(_rounds_profile(target_dir, draft_dir, True), "r.yaml")
    with pytest.raises(ProfileError, match=r"generation.rounds: must be >= 1, got 0"):
        parse_profile(_rounds_profile(target_dir, draft_dir, 0), "r.yaml")


def test_each_process_alternates_its_own_rounds():
    """Under torchrun a rank may own every other repeat (cell n goes to rank n % world size, the
    repeat fastest): the order alternates over the rounds it owns, not by the repeat's number."""
    from harness.runner import sweep_plan

    a, b = (parse_profile({"models": {"target": "t"}, "prompts": {"items": ["x"]},
                           "decoders": [{"name": "sampling", "label": label}]}, "p.yaml").decoders[0]
            for label in ("a", "b"))
    owned = [(spec, 0, "x", r) for spec in (a, b) for r in (1, 3, 5)]  # rank 1 of 2, six repeats
    plan = sweep_plan((a, b), owned, 6, 6, owned_rounds=[1, 3, 5])
    assert [(spec.label, round_) for _, spec, round_, _ in plan] == [
        ("a", 1), ("b", 1), ("b", 3), ("a", 3), ("a", 5), ("b", 5)]
    # Resumed with round 1 finished: round 3 still runs second, reversed.
    plan = sweep_plan((a, b), owned[1:3] + owned[4:], 6, 6, owned_rounds=[1, 3, 5])
    assert [(spec.label, round_) for _, spec, round_, cells in plan if cells] == [
        ("b", 3), ("a", 3), ("a", 5), ("b", 5)]


def test_a_sweeps_next_attempt_is_past_every_earlier_one():
    from harness.runner import _next_attempt

    earlier = ["00-sd-round1-a0", "00-sd-round1-a2-recovered", "00-sd-round10-a7", "00-sd-round1-r1-a9", "x"]
    assert _next_attempt("00-sd-round1", earlier) == 3  # a gap (a1) is not reused
    assert _next_attempt("00-sd-round2", earlier) == 0
