"""``harness profile`` front doors: one clear line and the right exit code, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from harness import trace
from harness.profile_spec import ProfileError, load_profile, parse_profile
from harness.prompts import Prompt

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "profiles" / "smoke.yaml"
# A short smoke run: 3 decoders x 4 prompts x 1 repeat.
SMALL = ["--set", "generation.max_new_tokens=8", "--set", "generation.repeats=1"]


def harness_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The ``error:`` line of a refused command; there is exactly one, and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def write_profile(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    for section, value in changes.items():
        raw[section] = {**raw[section], **value} if isinstance(value, dict) else value
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A complete short smoke run through the real CLI (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("small") / "run"
    proc = harness_cli("profile", str(SMOKE), "-o", str(run_dir), "--no-progress", "--no-report", *SMALL)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def resume(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return harness_cli("profile", str(SMOKE), "-o", str(run_dir), "--no-progress", "--resume", *SMALL, *extra)


def test_bogus_device_is_a_profile_error(tmp_path):
    proc = harness_cli("profile", str(SMOKE), "--set", "models.device=bogus", "-o", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert "models.device" in proc.stderr and "'bogus'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
    raw = yaml.safe_load(SMOKE.read_text())
    raw["models"]["device"] = "cuda:x"
    with pytest.raises(ProfileError, match="models.device"):
        parse_profile(raw)


def test_set_with_a_value_that_is_not_yaml_is_one_clear_line(tmp_path):
    proc = harness_cli("profile", str(SMOKE), "--set", "generation.max_new_tokens=[1", "-o", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "generation.max_new_tokens=[1" in proc.stderr and "not valid YAML" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_prompt_longer_than_the_context_is_refused_before_decoding(tmp_path):
    # The tiny target has 1,024 positions; this prompt tokenises to 1,000 tokens.
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "tiny-p", "q": "Hi"}) + "\n"
                                      + json.dumps({"id": "long-one", "q": "word " * 200}) + "\n")
    profile = write_profile(tmp_path, prompts={"file": "p.jsonl", "field": "q", "id_field": "id",
                                               "chat_template": False, "items": []},
                            generation={"max_new_tokens": 32, "repeats": 1, "warmup": 0})
    proc = harness_cli("profile", str(profile), "-o", str(tmp_path / "run"), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert "long-one" in line and "1024" in line and "max_new_tokens" in line and "tiny-p" not in line
    assert not (tmp_path / "run").exists(), "nothing is written for a run that cannot start"


def test_context_check_counts_prompt_plus_new_tokens():
    from harness.prompts import check_context_length

    class Config:
        max_position_embeddings = 10

    class Model:
        config = Config()

    def prompt(pid: str, n: int) -> Prompt:
        return Prompt(pid, "x", torch.zeros((1, n), dtype=torch.long))

    check_context_length([prompt("a", 6)], 4, {"m": Model()})  # 6 + 4 = 10 positions fit
    with pytest.raises(ValueError, match=r"prompt b .*11 positions.*max_position_embeddings 10"):
        check_context_length([prompt("a", 6), prompt("b", 7)], 4, {"m": Model()})


def test_draft_of_a_sampling_only_profile_is_not_loaded_nor_recorded(tmp_path):
    profile = write_profile(tmp_path, decoders=[{"name": "sampling"}],
                            prompts={"items": ["Hello"]}, generation={"max_new_tokens": 4, "repeats": 1, "warmup": 0})
    run_dir = tmp_path / "run"
    proc = harness_cli("profile", str(profile), "-o", str(run_dir), "--no-progress", "--no-report")
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "models.draft" in proc.stderr and "not loaded" in proc.stderr
    gens = pd.read_parquet(run_dir / trace.GENERATIONS)
    assert gens.draft_model.isna().all()
    info = json.loads((run_dir / trace.RUN_JSON).read_text())
    assert info["model_info"]["draft_params"] is None
    assert load_profile(profile).models.draft is None


def test_resume_with_a_broken_run_json_names_the_file(small_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    (run_dir / trace.RUN_JSON).write_text('{"status": "running\x01"}')
    proc = resume(run_dir)
    assert proc.returncode == 2, proc.stderr
    assert str(run_dir / trace.RUN_JSON) in error_line(proc)


@pytest.mark.slow
def test_resume_with_a_truncated_part_names_it_and_its_advice_works(small_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    bad = next((run_dir / trace.GENERATIONS).glob("part-01-*.parquet"))
    os.truncate(bad, 100)
    proc = resume(run_dir)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert str(bad) in line and "delete it" in line and "--resume" in line
    bad.unlink()  # what the message says to do
    again = resume(run_dir, "--no-report")
    assert again.returncode == 0, again.stderr
    gens = pd.read_parquet(run_dir / trace.GENERATIONS)
    steps = pd.read_parquet(run_dir / trace.STEPS)
    assert len(gens) == 12 and not gens.duplicated(["decoder_label", "prompt_id", "repeat"]).any()
    assert len(steps) == gens.iterations.sum()


@pytest.mark.slow
def test_resume_redoes_generations_whose_steps_are_missing(small_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    before = pd.read_parquet(run_dir / trace.GENERATIONS)
    next((run_dir / trace.STEPS).glob("part-00-*.parquet")).unlink()  # the sampling sweep's steps
    proc = resume(run_dir, "--no-report")
    assert proc.returncode == 0, proc.stderr
    gens = pd.read_parquet(run_dir / trace.GENERATIONS)
    steps = pd.read_parquet(run_dir / trace.STEPS)
    assert len(gens) == 12 and not gens.duplicated(["decoder_label", "prompt_id", "repeat"]).any()
    assert len(steps) == gens.iterations.sum()
    per_gen = steps.groupby(["decoder_label", "prompt_id", "repeat"]).size()
    assert per_gen.sort_index().equals(gens.set_index(["decoder_label", "prompt_id", "repeat"]).iterations.sort_index())
    redone = gens[gens.decoder_label == "sampling"]
    # Same seeds, so the redone generations equal the lost ones.
    old = before[before.decoder_label == "sampling"].set_index("prompt_id").output_tokens.map(list)
    assert redone.set_index("prompt_id").output_tokens.map(list).to_dict() == old.to_dict()


@pytest.mark.slow
def test_report_failing_at_the_end_of_a_complete_run_warns_and_keeps_exit_0(small_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    (run_dir / "report.html").mkdir()  # the report cannot be written there
    proc = resume(run_dir)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "warning:" in proc.stderr and "report.html" in proc.stderr and "traces" in proc.stderr
    assert "harness report" in proc.stderr  # how to render it elsewhere
    assert json.loads((run_dir / trace.RUN_JSON).read_text())["status"] == "complete"


@pytest.mark.slow
def test_ctrl_c_mid_run_exits_130_with_a_resume_hint(tmp_path):
    run_dir = tmp_path / "run"
    # A shell without job control starts background jobs with SIGINT ignored, and
    # children inherit that; a terminal's Ctrl-C reaches a process with the default.
    proc = subprocess.Popen([sys.executable, "-m", "harness", "profile", str(SMOKE), "-o", str(run_dir),
                             "--no-progress", "--set", "generation.max_new_tokens=64"],
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list((run_dir / trace.GENERATIONS).glob("*.parquet")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "--resume" in err and str(run_dir) in err and "generation.max_new_tokens=64" in err
    assert json.loads((run_dir / trace.RUN_JSON).read_text())["status"] == "running"
