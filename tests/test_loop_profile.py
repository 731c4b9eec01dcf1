"""benchmarks/loop_profile.py's accounting of a device timeline and of graph replays."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.test_profile import ROOT

_spec = importlib.util.spec_from_file_location("loop_profile", ROOT / "benchmarks" / "loop_profile.py")
loop_profile = importlib.util.module_from_spec(_spec)
sys.modules["loop_profile"] = loop_profile  # its dataclass looks its module up
_spec.loader.exec_module(loop_profile)


def test_timeline_unions_overlapping_intervals_and_measures_the_gaps():
    # Two concurrent kernels (0-10, 5-12), one nested (6-7), a gap of 3, one more, a gap of 8, a last one.
    line = loop_profile.timeline([(15, 20), (0, 10), (6, 7), (5, 12), (28, 30)])
    assert line.span_us == 30
    assert line.busy_us == 12 + 5 + 2
    assert line.gaps_us == (3, 8)
    assert line.idle_us == pytest.approx(sum(line.gaps_us))


def test_timeline_of_nothing_and_of_one_interval():
    assert loop_profile.timeline([]) == loop_profile.Timeline(0.0, 0.0, ())
    line = loop_profile.timeline([(4.0, 9.5)])
    assert (line.span_us, line.busy_us, line.gaps_us) == (5.5, 5.5, ())


def test_a_long_interval_covers_later_short_ones():
    line = loop_profile.timeline([(0, 100), (10, 20), (30, 40), (120, 130)])
    assert (line.span_us, line.busy_us, line.gaps_us) == (130, 110, (20,))


def test_graphs_alone_weighs_each_shape_by_its_replays():
    counts = {"one-token": 100, "five-token": 20}
    alone = {"one-token": 1.3, "five-token": 2.0, "unused": 9.0}
    assert loop_profile.graphs_alone_ms(counts, alone) == pytest.approx(100 * 1.3 + 20 * 2.0)


def test_gaps_are_the_stretches_no_interval_covers():
    spans = loop_profile.timeline([(50, 60), (0, 10), (5, 30), (100, 101), (31, 40)]).gaps_over(5)
    assert spans == [(40, 50), (60, 100)]  # 30-31 is under 5 us
    # A long interval covers the shorter ones that start and end inside it.
    assert loop_profile.timeline([(0, 100), (10, 20), (130, 140)]).gaps_over(20) == [(100, 130)]


def test_host_time_in_gaps_is_split_by_operation_and_the_rest_is_between_ops():
    gaps = [(10.0, 20.0), (30.0, 40.0)]
    ops = [("aten::cat", 8.0, 12.0),  # 2 us inside the first gap
           ("cudaGraphLaunch", 15.0, 18.0),  # 3 us inside it
           ("aten::cat", 25.0, 35.0),  # 5 us inside the second
           ("aten::copy_", 50.0, 60.0)]  # outside both
    spent = loop_profile.host_in_gaps(gaps, ops)
    assert spent["aten::cat"] == 7.0
    assert spent["cudaGraphLaunch"] == 3.0
    assert "aten::copy_" not in spent
    assert spent["(between ops)"] == (10 - 5) + (10 - 5)
    assert sum(spent.values()) == 20.0


def test_host_ops_overlapping_in_a_gap_leave_the_rest_between_ops_once():
    # Two operations of another thread overlapping (2-8 and 4-9) inside one gap of 10: 7 us covered.
    spent = loop_profile.host_in_gaps([(0.0, 10.0)], [("a", 2.0, 8.0), ("b", 4.0, 9.0)])
    assert spent["(between ops)"] == 3.0
    assert (spent["a"], spent["b"]) == (6.0, 5.0)


def test_the_host_time_in_gaps_is_differenced_with_its_sign():
    base = {"span_us": 100.0, "busy_us": 80.0, "idle_us": 20.0, "gaps_over_20us": 1, "activities": 10,
            "host_blocked_us": None, "per_name_us": loop_profile.collections.Counter()}
    long = {**base, "span_us": 300.0, "gaps_us": 60.0,
            "host_in_gaps_us": loop_profile.collections.Counter({"launch": 50.0, "(between ops)": 10.0})}
    short = {**base, "gaps_us": 20.0,
             "host_in_gaps_us": loop_profile.collections.Counter({"launch": 5.0, "(between ops)": 15.0})}
    row = loop_profile.timeline_per_token(long, short, tokens=10)
    assert row["gaps_over_20us_us_per_token"] == 4.0
    assert row["host_in_gaps_us_per_token"] == {"launch": 4.5, "(between ops)": -0.5}
    assert sum(row["host_in_gaps_us_per_token"].values()) == row["gaps_over_20us_us_per_token"]


def test_timelines_of_several_generations_add_up():
    counter = loop_profile.collections.Counter
    a = {"span_us": 100.0, "busy_us": 80.0, "gaps_over_20us": 1, "host_blocked_us": 5.0,
         "per_name_us": counter({"gemv": 50.0, "attention": 30.0}), "tokens": 16, "target_calls": 8}
    b = {"span_us": 50.0, "busy_us": 50.0, "gaps_over_20us": 0, "host_blocked_us": None,
         "per_name_us": counter({"gemv": 20.0, "argmax": 1.0}), "tokens": 16, "target_calls": 4}
    total = loop_profile.summed_timelines([a, b])
    assert (total["span_us"], total["busy_us"], total["gaps_over_20us"]) == (150.0, 130.0, 1)
    assert total["per_name_us"] == counter({"gemv": 70.0, "attention": 30.0, "argmax": 1.0})
    assert (total["tokens"], total["target_calls"]) == (32, 12)
    assert total["host_blocked_us"] is None  # unknown in one run: unknown in the sum


def test_the_table_has_a_cell_per_column():
    row = {"pair": "qwen", "setting": "t1-k1", "decoder": "sampling", "ms_per_token": 1.5,
           "graphs_alone_ms_per_token": 1.4, "loop_x_alone": 1.07, "draft_x_alone": None, "verify_x_alone": 1.07,
           "profiled_ms_per_token": 1.6, "busy_share": 0.9}
    header, rule, line = loop_profile.table([row]).splitlines()
    assert header.count("|") == rule.count("|") == line.count("|")
    assert "| 1.600 | 90% |" in line


def test_the_timeline_profiles_the_loops_own_generations(monkeypatch):
    """Each prompt's long and short generation with the loop's seed (prompt i: seed i), summed and
    differenced, after one generation thrown away; tokens per call from the profiled runs."""
    import types

    import torch

    calls = []

    class Decoder:
        def generate(self, prompt, length, generator):
            calls.append((int(prompt[0, 0]), length, generator.initial_seed()))
            # Two tokens per target call, as a decoder drafting one token that is always accepted.
            return types.SimpleNamespace(tokens=torch.zeros(length), target_forwards=length // 2)

    def fake_timeline(fn, host_ops=False):
        fn()
        prompt, length, _ = calls[-1]
        return {"span_us": 10.0 * length + prompt, "busy_us": 8.0 * length, "idle_us": 2.0 * length + prompt,
                "gaps_over_20us": 0, "activities": length, "host_blocked_us": 1.0,
                "per_name_us": loop_profile.collections.Counter({"gemv": 8.0 * length})}

    monkeypatch.setattr(loop_profile, "device_timeline", fake_timeline)
    prompts = [torch.full((1, 3), p) for p in (7, 9)]
    n, short = 16, loop_profile.SHORT
    row = loop_profile.loop_timeline(Decoder(), prompts, n)
    assert calls == [(7, short, 0), (7, n + short, 0), (9, n + short, 1), (7, short, 0), (9, short, 1)]
    assert row["profiled_ms_per_token"] == pytest.approx(10.0 / 1e3)  # the prompts' constant cancels
    assert row["busy_share"] == pytest.approx(0.8)
    assert row["profiled_tokens_per_call"] == pytest.approx(2.0)
    assert row["top_kernels_us_per_token"] == {"gemv": pytest.approx(8.0)}
