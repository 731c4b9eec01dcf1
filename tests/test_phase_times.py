"""Each generation's time split into draft / verify / accept / other (``decoders.timing``)."""

from __future__ import annotations

import time

import pytest
import torch

from decoders import get_decoder
from decoders.timing import PHASES, PhaseTimer


def test_timer_gives_each_interval_to_its_phase():
    timer = PhaseTimer(torch.device("cpu"))
    time.sleep(0.05)
    timer.mark("draft")
    time.sleep(0.02)
    timer.mark("verify")
    timer.mark("other")
    time.sleep(0.03)
    timer.mark("draft")
    totals = timer.totals_s()
    assert set(totals) == set(PHASES) and totals["accept"] == 0.0
    assert totals["draft"] == pytest.approx(0.08, abs=0.015)
    assert totals["verify"] == pytest.approx(0.02, abs=0.01)


@pytest.mark.parametrize("name", ["sampling", "specdecode", "mtad", "prompt_lookup"])
def test_phases_add_up_to_the_generation(tiny, prompt, name):
    draft = tiny.draft if name in ("specdecode", "mtad") else None
    dec = get_decoder(name, target=tiny.target, draft=draft, temperature=1.0, top_k=10, top_p=0.9)
    start = time.perf_counter()
    out = dec.generate(prompt, 40, torch.Generator().manual_seed(0))
    wall = time.perf_counter() - start
    times = out.phase_times_s
    assert set(times) == set(PHASES) and all(t >= 0 for t in times.values())
    assert sum(times.values()) == pytest.approx(wall, rel=0.2)
    assert times["verify"] > 0 and times["accept"] > 0
    if name == "sampling":
        assert times["draft"] == 0.0
    else:
        assert times["draft"] > 0
