"""benchmarks/host_ops.py's count of the host's operations outside the forwards."""

from __future__ import annotations

import importlib.util

import torch

from tests.test_profile import ROOT

_spec = importlib.util.spec_from_file_location("host_ops", ROOT / "benchmarks" / "host_ops.py")
host_ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_ops)


def test_counter_skips_forwards_and_tells_views_from_launches():
    x = torch.ones(4)
    counter = host_ops._Counter()
    with counter:
        y = x * 2  # a launch
        counter.depth += 1
        x + y, x.sum()  # inside a forward: not counted
        counter.depth -= 1
        y.view(2, 2), y[1:]  # views
        torch.empty(3)  # an allocation: no kernel
        y.argmax()  # a launch
    assert counter.counts["launch"] == 2
    assert counter.counts["view"] == 3
    assert counter.counts["aten.add.Tensor"] == 0


def test_sampling_iteration_is_one_forward_and_its_draw():
    target = host_ops._model(64, 1, 16, 0)
    row = host_ops.measure("sampling", "t1", target, None, torch.tensor([[1, 2, 3, 4]]), 12)
    assert row["iterations"] == 12 and row["forwards_per_iteration"] == 1.0
    # The forward's own operations (hundreds) are excluded; what is left is a handful per token.
    assert 1 <= row["launches_per_iteration"] < 20
    assert row["top_launches"]["aten.argmax.default"] == 1.0  # the draw, once per token
    assert row["gpu_launches_per_iteration"] == row["launches_per_iteration"] + host_ops.GPU_LAUNCHES_PER_FORWARD
