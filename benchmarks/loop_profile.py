"""What each decoder's loop costs beyond its forwards: the loop against its own graphs replayed alone.

    python benchmarks/loop_profile.py [--pairs qwen,smollm2] [--methods sampling,specdecode,mtad,prompt_lookup,eagle]
        [--settings greedy,t1] [--new-tokens 128] [--prompts 4] [--real] [--host-ops] [--timeline-prompts N]
        [--no-timeline] [--no-clock] [--out PATH]

(settings run in the order given, repeats allowed: ``--settings t1,greedy,t1,greedy``; besides
``gpu_decoding``'s greedy and t1, ``t1-k1`` is greedy's distribution through the T>0 path: see
``DIAGNOSTIC_SETTINGS``)

Why: in the H200 pace runs every forward inside the decoders' loops took 1.3-1.6x
what the same step's graph replay took in ``step_profile.py`` (sampling on the
Qwen 1.5B: 1.73-1.94 ms of device time per verify against a 1.33 ms replay;
specdecode's 0.5B draft steps 1.18 against 0.73), on runs made on different
loans. An overhead per forward makes every method pay by its forward count, so
a comparison between methods reads partly as our loop's cost. This script
measures it in one process, per pair, setting and decoder:

1. the loop: ``generate`` of ``--new-tokens`` + 8 and of 8 tokens (no EOS) from
   each prompt, differenced, so the prompt's eager forward and the first step
   cancel: ms per token of wall time, and the device time of each phase
   (``decoders.timing``: draft, verify, accept, other) per token;
2. the same graphs alone: every CUDA graph the loop replayed (the target's and
   the drafter's caches), each replayed back to back as the loop replays it
   (inputs copied in, outputs cloned), weighted by how often the differenced
   loop replayed it: what the forwards alone cost, and the loop's draft and
   verify time as a multiple of it (``x alone``: 1.0 means the loop adds
   nothing to its forwards);
3. the device's timeline of the loop's own generations again (each prompt, long
   and short, the same seeds, so the same tokens and tokens per call), summed and
   differenced (``torch.profiler``, CUDA activity only; ``--no-timeline`` skips
   it): the share of the time the device was busy, its idle time per token, the
   host's time blocked in the runtime (synchronisations, and the device-to-host
   copies where each step's read waits), device activities per token and the
   kernels that took the most time. The profiler slows the host (each graph
   launch is traced), so its ms per token is printed beside the loop's: the
   further apart, the more its idle time overstates the loop's; with ``--host-ops`` also the host's operations, and
   what it was doing while the device waited (per operation name, the time
   inside the device's gaps; ``(between ops)`` is Python between them);
4. the SM clock (NVML, sampled every 20 ms during the loop; its mean and
   lowest) against the card's maximum, and the clock-event reasons seen.

How to read a row: ``x alone`` near 1 with the device busy throughout: the loop
adds nothing. Above 1 with the device busy: the same kernels run slower inside
the loop (clock, contention: see the clock columns and the kernel table). Idle
time: the host does not keep the device fed (then it spends little time
blocked).

Random-weight models of the real pairs' shapes by default (speed does not
depend on the weights; the drafts' acceptance does, so tokens per call are not
the real pairs'); ``--real`` loads the real pairs and HumanEval prompts instead
(``scripts/setup.sh --qwen`` for the Qwen pair).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decoding import HEADS, METHODS, PAIRS, SETTINGS, pace_prompts  # noqa: E402
from step_cost import build  # noqa: E402

from decoders import get_decoder, static  # noqa: E402
from decoders.eagle import EagleHead  # noqa: E402
from decoders.timing import PHASES  # noqa: E402
from harness.models import load_model, load_models  # noqa: E402
from harness.sysinfo import environment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: Random-weight shapes (benchmarks/step_cost.py) standing for each pair's target and draft.
SHAPE_PAIRS = {"qwen": ("qwen2.5-1.5b", "qwen2.5-0.5b"), "smollm2": ("smollm2-135m", "smollm2-135m-draft")}
SHORT = 8  # tokens of the generation subtracted from each long one

# Settings for questions about the loop itself, run only when named. Greedy sampling's loop took
# 1.09-1.17x its graph replayed alone where T=1's took 0.99-1.11x, in processes that always ran
# greedy first. T=1 with top-k 1 draws greedy's tokens (but for ties at the top logit, which top-k
# keeps) through the T>0 path: the filter kernels inside the graph, where greedy runs an argmax and
# a scatter. Outside the graph the three do the same host work (the draw, the read). With the
# settings interleaved (--settings t1,greedy,t1-k1,greedy,t1,t1-k1), a gap that stays with the
# first place in the order, whichever setting holds it, is an order effect; one that stays with
# greedy wherever it runs, while t1-k1 runs like t1, is greedy's in-graph argmax and scatter.
DIAGNOSTIC_SETTINGS = {"t1-k1": {"temperature": 1.0, "top_k": 1, "top_p": 1.0}}
LOOP_SETTINGS = {**SETTINGS, **DIAGNOSTIC_SETTINGS}


@dataclass(frozen=True)
class Timeline:
    """The union of a device's activity intervals.

    Attributes:
        span_us: from the first start to the last end.
        busy_us: the length of the union of the intervals.
        gaps: the idle stretches between them, ``(start, end)``, in order.
    """

    span_us: float
    busy_us: float
    gaps: tuple[tuple[float, float], ...]

    @property
    def idle_us(self) -> float:
        return self.span_us - self.busy_us

    @property
    def gaps_us(self) -> tuple[float, ...]:
        """The gaps' lengths, in order."""
        return tuple(e - s for s, e in self.gaps)

    def gaps_over(self, min_us: float) -> list[tuple[float, float]]:
        """The gaps longer than ``min_us``."""
        return [(s, e) for s, e in self.gaps if e - s > min_us]


def timeline(intervals: list[tuple[float, float]]) -> Timeline:
    """The ``Timeline`` of ``[start, end)`` intervals, which may overlap (concurrent kernels)."""
    if not intervals:
        return Timeline(0.0, 0.0, ())
    ordered = sorted(intervals)
    busy, gaps = 0.0, []
    start, end = ordered[0]
    for s, e in ordered[1:]:
        if s > end:
            busy += end - start
            gaps.append((end, s))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return Timeline(max(e for _, e in ordered) - ordered[0][0], busy, tuple(gaps))


def host_in_gaps(gaps: list[tuple[float, float]], host_ops: list[tuple[str, float, float]]) -> collections.Counter:
    """Microseconds of each host operation name (``(name, start, end)``, top-level ones) that fell
    inside the device's ``gaps``; what the host was doing while the device waited for it. The
    gaps' time no operation covers (Python between operations) is under ``"(between ops)"``."""
    spent = collections.Counter()
    ops = sorted(host_ops, key=lambda op: op[1])
    for gs, ge in gaps:
        covered = []
        for name, s, e in ops:
            if s >= ge:
                break
            overlap = min(e, ge) - max(s, gs)
            if overlap > 0:
                spent[name] += overlap
                covered.append((max(s, gs), min(e, ge)))
        spent["(between ops)"] += (ge - gs) - timeline(covered).busy_us
    return spent


def graphs_alone_ms(counts: dict[tuple, int], replay_ms: dict[tuple, float]) -> float:
    """What ``counts`` replays of each graph cost when each replay takes ``replay_ms`` of its graph."""
    return sum(count * replay_ms[key] for key, count in counts.items())


class ClockSampler:
    """The GPU's SM clock, sampled on a thread every ``interval_s`` between ``start`` and ``stop`` (NVML)."""

    def __init__(self, device: int, interval_s: float = 0.02) -> None:
        import pynvml

        pynvml.nvmlInit()
        # NVML counts every GPU of the machine; CUDA only the visible ones.
        index = torch.cuda._get_nvml_device_index(device)
        self._nvml, self._handle, self._interval = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index), interval_s
        self.max_mhz = pynvml.nvmlDeviceGetMaxClockInfo(self._handle, pynvml.NVML_CLOCK_SM)
        self._samples: list[int] = []
        self._reasons = 0
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        reasons = getattr(self._nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            self._nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        while not self._stop.wait(self._interval):
            try:
                self._samples.append(self._nvml.nvmlDeviceGetClockInfo(self._handle, self._nvml.NVML_CLOCK_SM))
                self._reasons |= reasons(self._handle)
            except self._nvml.NVMLError as err:  # said in the row, not lost with the thread
                self._error = str(err)
                return

    def start(self) -> None:
        self._samples, self._reasons, self._error = [], 0, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        s = self._samples or [0]
        return {"sm_clock_mean_mhz": statistics.fmean(s), "sm_clock_min_mhz": min(s), "sm_clock_max_mhz": self.max_mhz,
                "clock_event_reasons": hex(self._reasons), "clock_samples": len(self._samples),
                **({"clock_error": self._error} if self._error else {})}


def _graphs(models) -> dict[tuple, static._Graph]:
    """Every captured graph of these models' kept caches, by (model index, cache index, shape key)."""
    return {(m, c, key): graph for m, model in enumerate(models) if model is not None
            for c, cache in enumerate(static._POOL.get(model, [])) for key, graph in cache._graphed.items()}


def replay_alone_ms(graph: static._Graph, repeats: int = 20, rounds: int = 5) -> float:
    """ms of one replay of ``graph`` as the loop replays it (inputs copied in from other
    tensors, outputs cloned), ``repeats`` back to back between two events; the median of
    ``rounds``."""
    inputs = tuple(t.clone() for t in graph.inputs)  # copying a buffer into itself would copy nothing
    graph.replay(inputs)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay(inputs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / repeats)
    return statistics.median(times)


# The profiler's own host events (kineto's buffer handling), not the decoder's work.
PROFILER_OWN = ("Activity Buffer", "Buffer Flush")


def device_timeline(fn, host_ops: bool = False) -> dict:
    """Totals of the device's timeline while ``fn()`` runs (torch.profiler, CUDA activity):
    span, busy and idle microseconds, gaps over 20 us, device activities (kernels, copies),
    the host's time blocked in the runtime (synchronisations, and device-to-host copies into
    pageable memory, where ``.tolist()`` waits), and microseconds per kernel name. With
    ``host_ops``, the host's operations are recorded too (which slows the host a little) and
    ``host_in_gaps_us`` says what it did while the device waited in gaps over 20 us."""
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if host_ops else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    device, per_name, blocked_us, runtime_calls, ops = [], collections.Counter(), 0.0, 0, []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            device.append((e.time_range.start, e.time_range.end))
            per_name[e.name[:80]] += e.time_range.elapsed_us()
            continue
        if e.name.startswith("cuda"):  # a runtime call on the host
            runtime_calls += 1
            if "Synchronize" in e.name or e.name.startswith("cudaMemcpy"):
                blocked_us += e.time_range.elapsed_us()
        if host_ops and e.cpu_parent is None and not e.name.startswith(PROFILER_OWN):
            ops.append((e.name[:60], e.time_range.start, e.time_range.end))
    line = timeline(device)
    long_gaps = line.gaps_over(20.0)
    totals = {"span_us": line.span_us, "busy_us": line.busy_us, "idle_us": line.idle_us,
              "gaps_over_20us": len(long_gaps), "activities": len(device),
              # None where the profiler recorded no runtime calls (then nothing is known of the host).
              "host_blocked_us": blocked_us if runtime_calls else None, "per_name_us": per_name}
    if host_ops:
        totals["host_in_gaps_us"] = host_in_gaps(long_gaps, ops)
        totals["gaps_us"] = sum(e - s for s, e in long_gaps)
    return totals


def profiled_generation(dec, prompt: torch.Tensor, length: int, seed: int, host_ops: bool) -> dict:
    """``device_timeline`` of one ``generate`` (seeded ``seed``), with its tokens and target calls."""
    out = []
    totals = device_timeline(lambda: out.append(dec.generate(prompt, length, torch.Generator().manual_seed(seed))),
                             host_ops)
    return {**totals, "tokens": len(out[0].tokens), "target_calls": out[0].target_forwards}


def summed_timelines(runs: list[dict]) -> dict:
    """``device_timeline`` totals of several generations added up: numbers summed, counters
    merged; a total that any run lacks (None: nothing known of the host) stays None."""
    summed = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        if any(v is None for v in values):
            summed[key] = None
        elif isinstance(values[0], collections.Counter):
            summed[key] = sum(values, collections.Counter())
        else:
            summed[key] = sum(values)
    return summed


def timeline_per_token(long: dict, short: dict, tokens: int) -> dict:
    """The difference of two ``device_timeline`` totals (a long and a short generation from
    the same prompt, so the prompt's forward and the first step cancel), per token."""
    def diff(key):
        return None if long[key] is None or short[key] is None else (long[key] - short[key]) / tokens

    span, busy = diff("span_us"), diff("busy_us")
    per_name = long["per_name_us"] - short["per_name_us"]  # Counter subtraction keeps what grew
    host = {}
    if "host_in_gaps_us" in long:
        # Signed, over every name either run has (Counter subtraction would drop what shrank),
        # so the names add up to the gaps' time per token, reported beside them.
        names = set(long["host_in_gaps_us"]) | set(short["host_in_gaps_us"])
        grew = {k: (long["host_in_gaps_us"][k] - short["host_in_gaps_us"][k]) / tokens for k in names}
        host = {"gaps_over_20us_us_per_token": diff("gaps_us"),
                "host_in_gaps_us_per_token": {k: round(v, 2) for k, v in
                                              sorted(grew.items(), key=lambda kv: -abs(kv[1]))}}
    return {**host, "profiled_ms_per_token": span / 1e3, "busy_share": busy / span if span else None,
            "idle_ms_per_token": diff("idle_us") / 1e3, "gaps_over_20us_per_token": diff("gaps_over_20us"),
            "host_blocked_ms_per_token": None if diff("host_blocked_us") is None else diff("host_blocked_us") / 1e3,
            "activities_per_token": diff("activities"),
            "top_kernels_us_per_token": {k: v / tokens for k, v in per_name.most_common(12)}}


def _label(key: tuple) -> str:
    """A graph's name in the JSON: whose cache, which cache, and its shape key (tokens fed, logits
    kept, filters, inputs, hidden states)."""
    model, cache, (n, keep, filters, inputs, hidden) = key
    return (f"{('target', 'draft')[model]} cache {cache} n={n} keep={keep} filters={filters}"
            + (" features" if inputs > 1 else "") + (" hidden" if hidden else ""))


def profile_decoder(dec, models, prompts, n: int, clock: ClockSampler | None, with_timeline: bool = True,
                    host_ops: bool = False, timeline_prompts: int | None = None) -> dict:
    """One decoder's row: the differenced loop, its graphs alone, the timeline (of the loop's first
    ``timeline_prompts`` prompts; all when None) and the clock."""
    with torch.inference_mode():
        dec.generate(max(prompts, key=lambda p: p.shape[1]), n + SHORT, torch.Generator().manual_seed(0))
        graphs = _graphs(models)
        counts = collections.Counter()
        phases = dict.fromkeys(PHASES, 0.0)
        wall = tokens = target_calls = draft_calls = 0
        if clock:
            clock.start()
        for i, prompt in enumerate(prompts):
            for length, sign in ((n + SHORT, 1), (SHORT, -1)):
                before = {k: g.replays for k, g in graphs.items()}
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = dec.generate(prompt, length, torch.Generator().manual_seed(i))
                torch.cuda.synchronize()
                wall += sign * (time.perf_counter() - t0)
                tokens += sign * len(out.tokens)
                target_calls += sign * out.target_forwards
                draft_calls += sign * out.draft_forwards
                for k, v in out.phase_times_s.items():
                    phases[k] += sign * v
                for k, g in graphs.items():
                    counts[k] += sign * (g.replays - before[k])
        clocks = clock.stop() if clock else {}
        new = set(_graphs(models)) - set(graphs)
        # Every shape the difference kept, either way: a shape the short run replayed more
        # often is subtracted from the loop's time too.
        counts = {k: c for k, c in counts.items() if c != 0}
        alone = {k: replay_alone_ms(graphs[k]) for k in counts}
    target_alone, draft_alone = (graphs_alone_ms({k: c for k, c in counts.items() if k[0] == m}, alone)
                                 for m in (0, 1))
    loop_ms = {k: 1e3 * v for k, v in phases.items()}
    row = {
        "tokens": tokens, "ms_per_token": 1e3 * wall / tokens, "tokens_per_call": tokens / max(target_calls, 1),
        **{f"{k}_ms_per_token": v / tokens for k, v in loop_ms.items()},
        "graphs_alone_ms_per_token": (target_alone + draft_alone) / tokens,
        "verify_x_alone": loop_ms["verify"] / target_alone if target_alone else None,
        "draft_x_alone": loop_ms["draft"] / draft_alone if draft_alone else None,
        "loop_x_alone": sum(loop_ms.values()) / (target_alone + draft_alone) if target_alone else None,
        "verify_ms_per_call": loop_ms["verify"] / max(target_calls, 1),
        "draft_ms_per_call": loop_ms["draft"] / draft_calls if draft_calls else None,
        "replay_alone_ms": {_label(k): round(v, 4) for k, v in alone.items()},
        "replays_per_token": {_label(k): c / tokens for k, c in counts.items()},
        "graphs_captured_in_measured_loop": len(new),
        **clocks,
    }
    if with_timeline:  # last, and apart: the profiler may fail where the loop's figures stand
        try:
            row.update(loop_timeline(dec, prompts[:timeline_prompts], n, host_ops))
        except Exception as exc:  # noqa: BLE001 - reported in the row, the run goes on
            row["timeline_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


def loop_timeline(dec, prompts: list[torch.Tensor], n: int, host_ops: bool = False) -> dict:
    """The device's timeline of the loop's own generations, per token: each prompt's ``n + SHORT``
    and ``SHORT`` tokens with the loop's seeds (so the same tokens and acceptance), summed and
    differenced. Its ms per token is the device activity's span under the profiler, the loop's
    the host's wall time unprofiled: they differ by the profiler's cost and by the span's ends."""
    with torch.inference_mode():
        # One profiled generation thrown away first: the profiler's first session sets
        # itself up inside it, which would otherwise land in the long run only.
        device_timeline(lambda: dec.generate(prompts[0], SHORT, torch.Generator().manual_seed(0)), host_ops)
        long, short = (summed_timelines([profiled_generation(dec, prompt, length, i, host_ops)
                                         for i, prompt in enumerate(prompts)])
                       for length in (n + SHORT, SHORT))
    tokens, calls = long["tokens"] - short["tokens"], long["target_calls"] - short["target_calls"]
    return {**timeline_per_token(long, short, tokens), "profiled_tokens_per_call": tokens / max(calls, 1)}


def load_pair(name: str, real: bool, methods: list[str], prompts_per_kind: int):
    """(target, draft, EAGLE head or None, prompts) for ``name``: real models or random shapes."""
    if real:
        pair = load_models(*PAIRS[name], dtype="bfloat16", device="cuda")
        head = (load_model(HEADS[name], dtype="bfloat16", device="cuda", base=pair.target)
                if name in HEADS and "eagle" in methods else None)
        args = argparse.Namespace(prompts=prompts_per_kind)
        prompts = pace_prompts(pair, args)["code"]
        return pair.target, pair.draft, head, prompts
    target, draft = (build(shape) for shape in SHAPE_PAIRS[name])
    head = EagleHead.for_target(target) if "eagle" in methods else None
    gen = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    prompts = [torch.randint(0, vocab, (1, int(length)), generator=gen).cuda()
               for length in torch.linspace(64, 256, prompts_per_kind).tolist()]
    return target, draft, head, prompts


def table(rows: list[dict]) -> str:
    """Markdown: per row the loop, its graphs alone, the device timeline and the clock."""
    def f(v, fmt=".2f"):
        return "" if v is None else format(v, fmt)

    lines = ["| pair | setting | decoder | ms/token | graphs alone | loop x alone (draft / verify) | "
             "profiled ms/token | device busy | idle ms/token | host blocked ms/token | device activities/token | "
             "SM clock MHz (mean / min / max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['pair']} | {r['setting']} | {r['decoder']} | {f(r['ms_per_token'], '.3f')} | "
            f"{f(r['graphs_alone_ms_per_token'], '.3f')} | {f(r['loop_x_alone'])} ({f(r['draft_x_alone'])} / "
            f"{f(r['verify_x_alone'])}) | {f(r.get('profiled_ms_per_token'), '.3f')} | "
            f"{f(r.get('busy_share'), '.0%')} | {f(r.get('idle_ms_per_token'), '.3f')} | "
            f"{f(r.get('host_blocked_ms_per_token'), '.3f')} | {f(r.get('activities_per_token'), '.0f')} | "
            f"{f(r.get('sm_clock_mean_mhz'), '.0f')} / {f(r.get('sm_clock_min_mhz'), '.0f')} / "
            f"{f(r.get('sm_clock_max_mhz'), '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="qwen,smollm2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--real", action="store_true", help="the real pairs and HumanEval prompts (not random shapes)")
    ap.add_argument("--no-clock", action="store_true", help="no NVML clock sampling")
    ap.add_argument("--no-timeline", action="store_true", help="no torch.profiler timeline")
    ap.add_argument("--timeline-prompts", type=int, default=None,
                    help="profile the loop's first N prompts only (default: all; each is two profiled generations)")
    ap.add_argument("--host-ops", action="store_true",
                    help="record the host's operations in the timeline too, and say what it did in the device's gaps")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    methods = args.methods.split(",")
    if args.timeline_prompts is not None and args.timeline_prompts < 1:
        ap.error(f"--timeline-prompts: must be at least 1, got {args.timeline_prompts}")
    for what, given, known in (("--pairs", args.pairs, SHAPE_PAIRS), ("--methods", args.methods, METHODS),
                               ("--settings", args.settings, LOOP_SETTINGS)):
        unknown = set(given.split(",")) - set(known)
        if unknown:
            ap.error(f"{what}: unknown {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (it times CUDA-graph replays)")
    clock = None if args.no_clock else ClockSampler(torch.cuda.current_device())
    if not args.no_timeline:
        # The profiler's CUDA tracing started after graphs were captured has crashed or hung
        # (pytorch#75504); torch's own remedy initialises it before any capture.
        init = getattr(torch.profiler._utils, "_init_for_cuda_graphs", None)
        if init is not None:
            init()
    result = {"command": "python benchmarks/loop_profile.py " + " ".join(sys.argv[1:]),
              "environment": environment([torch.device("cuda")]), "real": args.real, "rows": []}

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")

    for name in args.pairs.split(","):
        target, draft, head, prompts = load_pair(name, args.real, methods, args.prompts)
        # In the order given, repeats included (--settings t1,greedy,t1,greedy: an order effect
        # shows as the same setting measuring differently in its two places).
        for setting in args.settings.split(","):
            filt = LOOP_SETTINGS[setting]
            for method in methods:
                if method == "mtad" and setting != "t1":
                    continue  # the joint test needs a distribution of more than one token
                params = METHODS[method]
                drafter = head if method == "eagle" else draft if method in ("specdecode", "mtad") else None
                if method == "eagle" and head is None:
                    continue
                dec = get_decoder(method, target=target, draft=drafter, **params, **filt)
                row = {"pair": name, "setting": setting, "decoder": method,
                       **profile_decoder(dec, [target, drafter], prompts, args.new_tokens, clock,
                                         with_timeline=not args.no_timeline, host_ops=args.host_ops,
                                         timeline_prompts=args.timeline_prompts)}
                result["rows"].append(row)
                save()
                print(table([row]).splitlines()[-1], flush=True)
                static.release_all()
        del target, draft, head
        torch.cuda.empty_cache()
    print(table(result["rows"]))
    save()


if __name__ == "__main__":
    main()
