"""benchmarks/host_ops.py's count of the host's operations outside the forwards."""

from __future__ import annotations

import importlib.util

import torch

from decoders import static
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


def test_launches_per_forward_are_what_a_graph_replay_dispatches():
    """``GPU_LAUNCHES_PER_FORWARD`` is one replay plus the operations ``_Graph.replay`` dispatches
    around it for a one-input, one-output graph (counted on a stand-in graph)."""

    class Replayed:
        calls = 0

        def replay(self):
            Replayed.calls += 1

    graph = object.__new__(static._Graph)
    graph.inputs, graph.out, graph.graph, graph.replays = (torch.zeros(1, 3),), torch.zeros(1, 3, 8), Replayed(), 0
    tokens = torch.ones(1, 3)
    counter = host_ops._Counter()
    with counter:
        graph.replay((tokens,))
    assert Replayed.calls == 1
    assert counter.counts["launch"] + Replayed.calls == host_ops.GPU_LAUNCHES_PER_FORWARD
