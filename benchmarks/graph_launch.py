"""What a CUDA graph costs to start on an idle device, by the number of kernels it holds.

Why: every assisted loop reads each iteration's outcome on the host (its one
synchronisation) and only then launches the next iteration's first graph, so the
device idles from that read until the graph's first kernel runs. Where that wait
grows with the graph's kernel count, a bigger graph (say, all of an iteration's
draft steps captured as one) starts later after every read, and what it saves in
launches it loses in idle time. This measures, for graphs of ``k`` small kernels in
a chain (``x.add_(1)`` on a 256-element tensor, ``k`` from 1 to a few thousand; a
decode step of a 24-30-layer model is 150-200 kernels, its filter included):

- device: us per replay, replayed back to back between two events (the graph's own time);
- host call: us the host spends inside the call (``graph.replay()``: ``cudaGraphLaunch``;
  for a model's step, the whole ``StaticCachedModel`` call: its copies and clone too);
- from idle: us from the call on an idle device to the host seeing it complete, less
  the device time: how much later than its device time alone an iteration's first
  graph is done after the read (the launch, the start, the host's wake-up);
- read: us of the host read of a one-element result after the graph (what the
  loops' ``tolist`` costs beyond the wait).

For the smallest graphs back-to-back replays run at the host's launch rate, so their
device time is overstated and the from-idle figure understated; a decode step is
bound by the device.

``--models`` does the same for the decode-step graphs the decoders replay: a 1-token
step of random-weight models of the pairs' shapes through ``StaticCachedModel`` (its
kernels launched with programmatic dependent launch, and without: ``pdl`` off).

``--relaunch`` asks what a graph launched again while its last launch still runs
costs: the same step's graph queued ``--replays`` times back to back, as one
executable graph relaunched (what the loops do: a sampling step, a draft model's
steps) and as two instances of the same capture taken in turn, alternated in one
process. Per replay: the host's time in the launches, and the device's span
between events around them (each replay's device time plus any idle between
replays: where a relaunch waits for the launch before it, the host cannot queue
ahead and the span holds the wait).

    python benchmarks/graph_launch.py [--kernels 1,16,64,256,1024,4096]
        [--models smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b] [--relaunch] [--replays 50] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown_result import print_table, write_result  # noqa: E402
from step_cost import FILLED, build  # noqa: E402

from decoders import decode_kernels, static  # noqa: E402


def captured(record, warm_up=None, pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """A graph of what ``record()`` launches, captured on a side stream (``warm_up()`` run
    there first, outside the capture, as PyTorch asks), and what ``record`` returned."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if warm_up is not None:
            warm_up()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = record()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph, out


def capture(kernels: int, x: torch.Tensor) -> torch.cuda.CUDAGraph:
    """A chain of ``kernels`` in-place adds on ``x``."""
    def chain():
        for _ in range(kernels):
            x.add_(1)

    return captured(chain, warm_up=lambda: x.add_(1))[0]


def measure(replay, rounds: int, repeats: int = 20) -> dict:
    """The figures above for ``replay()``: one graph launch, returning a tensor it writes."""
    replay()
    torch.cuda.synchronize()
    device, host, call_to_done, read = [], [], [], []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            replay()
        end.record()
        end.synchronize()
        device.append(start.elapsed_time(end) / repeats * 1e3)  # us
        torch.cuda.synchronize()
        called = time.perf_counter()
        out = replay()
        returned = time.perf_counter()
        torch.cuda.synchronize()
        host.append((returned - called) * 1e6)
        call_to_done.append((time.perf_counter() - called) * 1e6)
        reading = time.perf_counter()
        out.view(-1)[:1].tolist()
        read.append((time.perf_counter() - reading) * 1e6)
    device_us = statistics.median(device)
    return {"device_us": device_us, "host_call_us": statistics.median(host),
            "from_idle_us": statistics.median(call_to_done) - device_us, "read_us": statistics.median(read)}


def chain_of_kernels(kernels: int, rounds: int) -> dict:
    x = torch.zeros(256, device="cuda")
    graph = capture(kernels, x)

    def replay():
        graph.replay()
        return x

    return {"graph": f"{kernels} x add_", **measure(replay, rounds)}


def decode_step(name: str, pdl: bool, rounds: int) -> dict:
    """A 1-token step's graph of a random-weight ``name`` as the decoders replay it (the
    position filled, the token copied in, the graph launched, the output cloned)."""
    default = decode_kernels.PDL
    decode_kernels.PDL = pdl  # read when the step is captured
    try:
        cache = static.StaticCachedModel(build(name), 1, 1024, graphs=True, compile=None)
        tokens = torch.randint(0, 1000, (1, 1), device="cuda")
        cache(torch.randint(0, 1000, (1, FILLED), device="cuda"), keep=1)  # the prompt: eager

        def replay():
            cache.crop(FILLED)
            return cache(tokens, keep=1)

        return {"graph": f"{name} 1-token step, pdl {'on' if pdl else 'off'}", **measure(replay, rounds)}
    finally:
        decode_kernels.PDL = default


def relaunch_rows(label: str, capture_one, replays: int, rounds: int) -> list[dict]:
    """``capture_one()`` -> (graph, the tensor it writes), twice; the same step queued ``replays``
    times as one executable graph, and as the two taken in turn, alternated ``rounds`` times."""
    instances = [capture_one(), capture_one()]
    rows = []
    for round_ in range(rounds):
        for name, cycle in (("one graph relaunched", instances[:1]), ("two instances in turn", instances)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            called = time.perf_counter()
            for i in range(replays):
                graph, out = cycle[i % len(cycle)]
                graph.replay()
                out.clone()  # as the decoders keep each output
            queued = time.perf_counter()
            end.record()
            end.synchronize()
            rows.append({"graph": label, "launch": name, "round": round_,
                         "host_us_per_launch": (queued - called) / replays * 1e6,
                         "span_us_per_replay": start.elapsed_time(end) / replays * 1e3})
    return rows


def relaunch(kernels: list[int], models: list[str], replays: int, rounds: int) -> list[dict]:
    rows = []
    for k in kernels:
        x = torch.zeros(256, device="cuda")
        rows += relaunch_rows(f"{k} x add_", lambda k=k, x=x: (capture(k, x), x), replays, rounds)
    for name in models:
        cache = static.StaticCachedModel(build(name), 1, 1024, graphs=True, compile=None)
        cache(torch.randint(0, 1000, (1, FILLED), device="cuda"), keep=1)  # the prompt: eager
        tokens = torch.randint(0, 1000, (1, 1), device="cuda")
        cache(tokens, keep=1)  # compiles the step's kernels (and captures the cache's own graph)

        def capture_step(cache=cache, tokens=tokens):
            cache.crop(FILLED)
            cache._start.fill_(FILLED)
            forward = cache._compiled_forward or cache._forward  # the decoders' path: decode kernels
            return captured(lambda: forward((tokens,), 1), pool=cache._pool)

        rows += relaunch_rows(f"{name} 1-token step", capture_step, replays, rounds)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", default="1,16,64,256,1024,4096")
    ap.add_argument("--models", default="", help="model shapes (benchmarks/step_cost.py) whose decode step to time")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--relaunch", action="store_true",
                    help="only the relaunch measurement: one graph relaunched against two instances in turn, "
                         "alternated in 3 rounds (--rounds is the other measurements')")
    ap.add_argument("--replays", type=int, default=50, help="replays queued back to back (--relaunch)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("graph_launch.py needs a CUDA device")
    kernels = [int(k) for k in args.kernels.split(",") if k]
    models = [name for name in args.models.split(",") if name]
    if args.relaunch:
        with torch.inference_mode():
            rows = relaunch(kernels, models, args.replays, rounds=3)
        print_table(["graph", "launch", "round", "host us per launch", "device span us per replay"],
                    [[r["graph"], r["launch"], r["round"], f"{r['host_us_per_launch']:.1f}",
                      f"{r['span_us_per_replay']:.1f}"] for r in rows])
        write_result(args.out, rows, "cuda")
        return
    rows = [chain_of_kernels(k, args.rounds) for k in kernels]
    with torch.inference_mode():
        rows += [decode_step(name, pdl, args.rounds) for name in models for pdl in (True, False)]
    print_table(["graph", "device us / replay", "host us in the call", "from idle, us over device time",
                 "host read us"],
                [[r["graph"], f"{r['device_us']:.1f}", f"{r['host_call_us']:.1f}", f"{r['from_idle_us']:.1f}",
                  f"{r['read_us']:.1f}"] for r in rows])
    write_result(args.out, rows, "cuda")


if __name__ == "__main__":
    main()
