"""benchmarks/gpu_decoding.py's pace table: rounds of sweeps combined into one ratio per decoder."""

from __future__ import annotations

import importlib.util

import pytest

from tests.test_profile import ROOT

_spec = importlib.util.spec_from_file_location("gpu_decoding", ROOT / "benchmarks" / "gpu_decoding.py")
gpu_decoding = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_decoding)


def _row(decoder, round_, tokens, seconds, calls, joules=None, prompts="code"):
    phases = {f"{k}_ms_per_token": 1e3 * seconds / tokens / 4 for k in gpu_decoding.PHASES}
    return {"pair": "qwen", "setting": "greedy", "prompts": prompts, "decoder": decoder, "round": round_,
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ms_per_token": 1e3 * seconds / tokens, "tokens_per_call": tokens / calls,
            "j_per_token": None if joules is None else joules / tokens, "floor_ms_per_token": 0.5,
            "x_floor": 1e3 * seconds / tokens / 0.5, "warmup_s": 1.0, **phases}


def test_rounds_are_summed_and_each_rounds_ratio_is_against_sampling_in_that_round():
    # Round 0: sampling first and slow (2 s); round 1: reversed, sampling last (1 s).
    rows = [_row("sampling", 0, 100, 2.0, 100, joules=50.0), _row("specdecode", 0, 100, 1.0, 25, joules=20.0),
            _row("specdecode", 1, 100, 1.0, 20, joules=30.0), _row("sampling", 1, 100, 1.0, 100, joules=40.0),
            {"pair": "qwen", "setting": "greedy", "prompts": "code", "decoder": "hf_generate",
             "tokens": 30, "seconds": 3.0, "tokens_per_s": 10.0, "ms_per_token": 100.0}]
    combined = {r["decoder"]: r for r in gpu_decoding.combined_rounds(rows)}
    sd, sampling = combined["specdecode"], combined["sampling"]
    assert (sd["rounds"], sd["tokens"], sd["seconds"]) == (2, 200, 2.0)
    assert sd["tokens_per_call"] == pytest.approx(200 / 45)
    assert sd["j_per_token"] == pytest.approx(50.0 / 200) and sampling["j_per_token"] == pytest.approx(90.0 / 200)
    assert sd["round_ratios"] == pytest.approx([2.0, 1.0])
    assert combined["hf_generate"]["round_ratios"] == []  # the anchors run once, after the rounds
    table = gpu_decoding.pace_table({"qwen": {"rows": rows}})
    assert "| qwen | greedy | code | specdecode | 100 | 1.50x (1.00-2.00, 2 rounds) |" in table
    assert "| qwen | greedy | code | hf_generate | 10 | 0.15x |" in table  # against 200 tokens in 3 s


def test_results_from_before_rounds_read_as_one_round():
    rows = [_row("sampling", 0, 100, 1.0, 100), _row("specdecode", 0, 100, 0.5, 25)]
    for r in rows:
        del r["round"]
    table = gpu_decoding.pace_table({"qwen": {"rows": rows}})
    assert "| qwen | greedy | code | specdecode | 200 | 2.00x |" in table


def test_pace_runs_every_decoder_in_rounds_of_alternating_order(tiny_dirs, monkeypatch):
    """bench_pace's control flow on the tiny pair on the CPU (the GPU calls stubbed): every decoder
    warmed once, then its sweeps in every round, the order reversed in odd rounds, the anchors last."""
    import argparse

    import torch

    from harness.models import load_models

    target_dir, draft_dir = tiny_dirs
    pair = load_models(str(target_dir), str(draft_dir), dtype="float32", device="cpu")
    ids = pair.tokenizer("Once upon a time", return_tensors="pt").input_ids
    monkeypatch.setattr(gpu_decoding, "load_models", lambda *a, **k: pair)
    monkeypatch.setattr(gpu_decoding, "pace_prompts", lambda pair, args: {"chat": [ids], "code": [ids[:, :3]]})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    args = argparse.Namespace(methods="sampling,specdecode", new_tokens=4, rounds=3, anchor_prompts=1)
    result, saves = {}, []
    gpu_decoding.bench_pace(args, "smollm2", 1e12, None, result, lambda: saves.append(len(result["rows"])))
    order = [(r["setting"], r["decoder"], r.get("round")) for r in result["rows"] if r["prompts"] == "chat"]
    forward = [("greedy", "sampling"), ("greedy", "specdecode"), ("t1", "sampling"), ("t1", "specdecode")]
    expected = ([(*s, 0) for s in forward] + [(*s, 1) for s in reversed(forward)] + [(*s, 2) for s in forward]
                + [(s, a, None) for s in ("greedy", "t1") for a in ("hf_generate", "hf_assisted")])
    assert order == expected
    assert saves == list(range(1, len(result["rows"]) + 1))  # saved after every row
    assert all(r["tokens"] > 0 and r["x_floor"] > 0 for r in result["rows"] if "x_floor" in r)
    table = gpu_decoding.pace_table({"smollm2": result})
    assert table.count("| smollm2 | greedy | chat | specdecode |") == 1  # three rounds, one line
