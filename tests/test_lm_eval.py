"""lm-evaluation-harness integration: the real ``lm_eval`` command, offline tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from tests.test_profile import ROOT

BIN = Path(sys.executable).parent
PAIR = "pretrained=builtin:tiny-random,draft=builtin:tiny-random-draft"
MODEL_ARGS = {
    "sampling": "pretrained=builtin:tiny-random",
    "specdecode": f"{PAIR},gamma=3",
    "mtad": f"{PAIR},gamma=3,beam_width=2,accept_thres=0.5",
}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sampling", "specdecode", "mtad"])
def test_lm_eval_command_runs_our_models(model, tmp_path):
    lm_eval = BIN / "lm_eval"
    if not lm_eval.exists():
        pytest.skip("lm_eval console script not installed in this environment")
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(lm_eval), "--model", model, "--model_args", MODEL_ARGS[model], "--tasks",
         "harness_capitals,harness_freegen", "--include_path", str(ROOT / "tasks"), "--limit", "2",
         "--output_path", str(out)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "harness_capitals" in proc.stdout and "exact_match" in proc.stdout
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["config"]["model"] == model
    assert set(results["results"]) == {"harness_capitals", "harness_freegen"}
    assert "exact_match,strip" in results["results"]["harness_capitals"]
    assert {"distinct_2,none", "words,none"} <= set(results["results"]["harness_freegen"])
    assert results["n-samples"]["harness_capitals"]["effective"] == 2
    # Per-request traces in harness profile's schema, beside lm-eval's results.
    traces = next((out / "decoding-traces").iterdir())
    gens = pd.read_parquet(traces / "generations.parquet")
    assert len(gens) == 4 and set(gens.decoder) == {model}
    assert sorted(gens.prompt_id) == ["harness_capitals/0", "harness_capitals/1",
                                      "harness_freegen/0", "harness_freegen/1"]
    params = json.loads(gens.params_json.iloc[0])
    if model != "sampling":
        assert params["gamma"] == 3
    by_task = gens.set_index("prompt_id")
    assert json.loads(by_task.loc["harness_capitals/0", "params_json"])["temperature"] == 0.0  # do_sample: false
    assert json.loads(by_task.loc["harness_freegen/0", "params_json"])["top_k"] == 10  # the task's top_k
    assert (gens.new_tokens <= 64).all()
    info = json.loads((traces / "run.json").read_text())
    assert info["source"] == "lm_eval" and info["status"] == "complete"


def test_plain_interpreter_start_stays_cheap():
    """The .pth hook must not import lm-eval, torch or our packages at start-up.

    Not even ``harness``: an installed copy bound at start would hide a checkout's own.
    """
    code = ("import sys; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'lm_eval', 'transformers', 'decoders', 'harness')]; "
            "print(heavy, 'decoding_harness_lm_eval' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd="/")
    if "True" not in proc.stdout:
        pytest.skip("the project is not installed with its .pth file (scripts/setup.sh installs it)")
    assert proc.stdout.strip() == "[] True"


def test_registry_keeps_builtin_models_and_adds_ours():
    code = ("from lm_eval.api.registry import get_model; "
            "print(get_model('hf').__name__, get_model('mtad').__name__, get_model('specdecode').__name__)")
    proc = subprocess.run([sys.executable, "-c", "import decoding_harness_lm_eval; " + code], capture_output=True,
                          text=True, env=_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["HFLM", "MTADLM", "SpecDecodeLM"]


def _request(context: str, **gen_kwargs):
    return SimpleNamespace(args=(context, gen_kwargs), task_name="t", doc_id=0)


def test_generate_until_honours_until_and_greedy(tiny):
    from decoders import get_decoder
    from harness.lm_eval_models import SamplingLM, SpecDecodeLM

    lm = SamplingLM(pretrained="builtin:tiny-random", device="cpu")
    context = "The quick brown fox"
    ids = lm.tok_encode(context)
    greedy = get_decoder("sampling", target=lm.models.target, temperature=0.0)
    free_tokens = greedy.generate(torch.tensor([ids]), max_new_tokens=24).tokens.tolist()
    free = lm.tokenizer.decode(free_tokens, skip_special_tokens=True)
    stop = next(c for c in free[3:] if c.strip())  # a character that appears mid-output
    [text] = lm.generate_until([_request(context, until=[stop], max_gen_toks=24, do_sample=False)],
                               disable_tqdm=True)
    assert text == free[: free.index(stop)]
    sd = SpecDecodeLM(pretrained="builtin:tiny-random", draft="builtin:tiny-random-draft", gamma=4, device="cpu")
    [sd_text] = sd.generate_until([_request(context, until=[stop], max_gen_toks=24, do_sample=False)],
                                  disable_tqdm=True)
    assert sd_text == text


def test_warm_up_takes_the_request_needing_the_longest_cache(tiny, tmp_path, monkeypatch):
    """Outside the window the adapter decodes the request with the most prompt + new
    tokens (its cache serves the rest), and again only when a later call needs more."""
    from harness import lm_eval_models
    from harness.lm_eval_models import SamplingLM

    fed = []
    timed = lm_eval_models.timed_generate

    def recording(decoder, prompt, max_gen, *args):
        fed.append(prompt.input_ids.shape[-1] + max_gen)
        return timed(decoder, prompt, max_gen, *args)

    monkeypatch.setattr(lm_eval_models, "timed_generate", recording)
    lm = SamplingLM(pretrained="builtin:tiny-random", device="cpu", trace_dir=str(tmp_path / "trace"))
    short, long = "Hi", "Once upon a time in a land far away there lived"
    calls = [_request(short, max_gen_toks=6), _request(long, max_gen_toks=4), _request(short, max_gen_toks=2)]
    lm.generate_until(calls, disable_tqdm=True)
    needs = [len(lm.tok_encode(short)) + 6, len(lm.tok_encode(long)) + 4, len(lm.tok_encode(short)) + 2]
    assert fed == [max(needs)] + needs
    fed.clear()
    lm.generate_until([_request(short, max_gen_toks=3)], disable_tqdm=True)  # fits: no second warm-up
    assert fed == [needs[0] - 3]
    lm.generate_until([_request(long, max_gen_toks=12)], disable_tqdm=True)  # longer: warmed again
    assert fed[1:] == [len(lm.tok_encode(long)) + 12] * 2


def test_bad_model_args_are_clear():
    from harness.lm_eval_models import MTADLM, SamplingLM

    with pytest.raises(ValueError, match="needs a draft"):
        MTADLM(pretrained="builtin:tiny-random", device="cpu")
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        MTADLM(pretrained="builtin:tiny-random", draft="builtin:tiny-random-draft", gamma=0, device="cpu")
    with pytest.raises(ValueError, match="takes no draft"):
        SamplingLM(pretrained="builtin:tiny-random", draft="builtin:tiny-random-draft", device="cpu")


@pytest.mark.slow
def test_harness_eval_front_door(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "eval", "--model", "sampling", "--model_args", MODEL_ARGS["sampling"],
         "--tasks", "harness_capitals", "--include_path", str(ROOT / "tasks"), "--limit", "1"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "harness_capitals" in proc.stdout and "exact_match" in proc.stdout
