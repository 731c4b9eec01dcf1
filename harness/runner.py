"""``harness profile``: run decoders side by side and trace every generation.

Data flows one way: profile -> runner -> decoder -> energy meter -> trace.
Each decoder setting is one *sweep* over (prompt, repeat), or with
``generation.rounds`` one sweep per round of its cells (``sweep_plan``); a sweep
is one energy window. Rows are written as they finish; ``resume`` skips finished
(decoder label, prompt, repeat) keys and runs the rest as a new sweep attempt.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from decoders import Decoder, GenerationOutput, StepRecord, get_decoder
from decoders.timing import PHASES
from harness import scorers, trace
from harness.distributed import Ranks, init_ranks, shutdown
from harness.energy import EnergyMeter, gpu_indices_for, measured
from harness.models import LoadedModels, load_draft, load_models, resolve_device, resolve_specs
from harness.profile_spec import DecoderSpec, Profile
from harness.prompts import Prompt, check_context_length, stop_check, tokenize_prompts
from harness.quality import output_perplexity
from harness.run_record import RunRecord


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists, or belongs to another profile)."""


def default_run_dir(profile: Profile) -> Path:
    """``runs/<name>-<fingerprint>``: the same profile always maps to the same folder."""
    return Path("runs") / f"{profile.name}-{profile.fingerprint()}"


def generation_seed(base_seed: int, prompt_id: str, repeat: int) -> int:
    """Seed of one (prompt, repeat): identical for every decoder, so comparisons are paired."""
    digest = hashlib.sha256(f"{base_seed}/{prompt_id}/{repeat}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eos_ids(models: LoadedModels) -> list[int]:
    ids = {models.tokenizer.eos_token_id}
    config_eos = getattr(models.target.generation_config, "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted(i for i in ids if i is not None)


def timed_generate(
    decoder: Decoder, prompt: Prompt, max_new_tokens: int, seed: int, eos: list[int], device: torch.device,
    should_stop=None,
) -> tuple[GenerationOutput, float, float]:
    """One generation; returns ``(output, time_s, ttft_s)``.

    The device is synchronised at the start and the end only. The first step's
    commit is the time to first token without a sync: decoders commit tokens
    they have already read from the device, and a sync there would also wait
    for the step ``sampling`` queues before reading its token.
    """
    input_ids = prompt.input_ids.to(device)
    first: list[float] = []

    def on_first_step(_record) -> None:
        if not first:
            first.append(time.perf_counter())

    _sync(device)
    start = time.perf_counter()
    out = decoder.generate(input_ids, max_new_tokens, torch.Generator().manual_seed(seed), eos, on_first_step,
                           should_stop)
    _sync(device)
    end = time.perf_counter()
    return out, end - start, first[0] - start


def _position_counts(out: GenerationOutput, width: int) -> tuple[list[int], list[int]]:
    drafted, accepted = [0] * width, [0] * width
    for s in out.steps:
        for j in range(s.drafted):
            drafted[j] += 1
        for j in range(s.accepted):
            accepted[j] += 1
    return drafted, accepted


def generation_row(
    ctx: dict[str, Any], spec: DecoderSpec, decoder: Decoder, prompt: Prompt, index: int, repeat: int,
    seed: int, out: GenerationOutput, time_s: float, ttft_s: float, ppl: float, text: str, eos: list[int],
) -> dict[str, Any]:
    n = len(out.tokens)
    drafted_pos, accepted_pos = _position_counts(out, decoder.max_draft_tokens)
    return {
        **ctx,
        "decoder_label": spec.label,
        "decoder": spec.name,
        "params_json": json.dumps(decoder.params, sort_keys=True),
        "prompt_id": prompt.prompt_id,
        "prompt_index": index,
        "repeat": repeat,
        "seed": seed,
        "prompt_tokens": prompt.input_ids.shape[1],
        "new_tokens": n,
        "stopped_at_eos": bool(n and int(out.tokens[-1]) in eos),
        "time_s": time_s,
        "ttft_s": ttft_s,
        "tpot_s": (time_s - ttft_s) / (n - 1) if n > 1 else None,
        "tokens_per_s": n / time_s if time_s > 0 else None,
        "iterations": len(out.steps),
        "tokens_per_iteration": n / len(out.steps),
        "mean_accepted": out.mean_accepted,
        "drafted_tokens": sum(s.drafted for s in out.steps),
        "accepted_tokens": sum(s.accepted for s in out.steps),
        "drafted_by_position": drafted_pos,
        "accepted_by_position": accepted_pos,
        "target_forwards": out.target_forwards,
        "draft_forwards": out.draft_forwards,
        **{f"{phase}_s": out.phase_times_s.get(phase) for phase in PHASES},
        "output_ppl": ppl,
        "gpu_energy_j": None,
        "energy_per_token_j": None,
        "energy_estimated": None,
        "output_text": text,
        "output_tokens": out.tokens.tolist(),
    }


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tps]:>8} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )


def prepare_run_dir(profile: Profile, run_dir: Path, resume: bool) -> dict[str, Any] | None:
    """Check the run directory; return the earlier run.json when resuming."""
    existing = run_dir / trace.RUN_JSON
    if not existing.exists():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunDirError(f"{run_dir} exists and is not a run directory; choose another -o")
        return None
    if not resume:
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume to complete it, or -o NEW_DIR for a new run"
        )
    old = trace.read_run_json(run_dir)
    if old.get("fingerprint") != profile.fingerprint():
        raise RunDirError(
            f"{run_dir} was started with a different profile (fingerprint {old.get('fingerprint')} != "
            f"{profile.fingerprint()}); resume only with the same profile and --set values"
        )
    trace.check_tables(run_dir)  # a damaged part fails here, before the model load
    return old


def run_profile(
    profile: Profile,
    run_dir: str | Path | None = None,
    *,
    energy: bool = False,
    resume: bool = False,
    show_progress: bool = True,
    meter: EnergyMeter | None = None,
    confirm_run_unsafe_code: bool = False,
) -> Path:
    """Run every decoder of ``profile`` over its prompts; return the run directory.

    Under torchrun each rank runs its share of the (decoder, prompt, repeat)
    cells and writes its own part files; rank 0 writes run.json.

    Args:
        profile: a validated profile.
        run_dir: where traces go (default ``default_run_dir(profile)``).
        energy: measure GPU energy with Zeus (fails early where impossible).
        resume: complete an interrupted run in ``run_dir``.
        show_progress: draw a progress bar.
        meter: an energy meter to use instead of building one (tests inject one).
        confirm_run_unsafe_code: allow a ``prompts.scorer`` that runs model-written code.
    """
    scorers.require_confirmation(profile, confirm_run_unsafe_code)  # before anything loads
    resolve_specs(profile.models.target, *profile.draft_specs())  # before the process group starts
    ranks = init_ranks()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(profile)
    previous = prepare_run_dir(profile, run_dir, resume)
    ranks.barrier()  # every rank has checked the folder before rank 0 writes to it
    device = ranks.device(profile.models.device)
    if energy and meter is None:  # before the (slow) model load
        meter = EnergyMeter(gpu_indices_for([resolve_device(device)]))
    models = load_models(profile.models.target, profile.models.draft, dtype=profile.models.dtype, device=device,
                         device_map=profile.models.device_map)
    drafts = _decoder_drafts(profile, models)
    if energy and meter is not None and profile.models.device_map:
        meter = EnergyMeter(gpu_indices_for(models.devices))  # every GPU the split target uses
    prompts = tokenize_prompts(profile.prompts, profile.base_dir, models.tokenizer)
    check_context_length(prompts, profile.generation.max_new_tokens, {**models.by_spec(), **drafts})
    run_dir.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        if previous is not None:
            trace.prepare_resume(run_dir)
        record = RunRecord.start(run_dir, run_id=f"{profile.name}-{profile.fingerprint()}-{int(time.time())}",
                                 source="profile", profile=profile.to_dict(), fingerprint=profile.fingerprint(),
                                 energy=bool(meter), models=models, world_size=ranks.world_size,
                                 previous=previous)
        if meter is not None:  # before any decoding, with the models loaded and the card at rest
            record.data["idle_power_w"] = meter.idle_power_w()
            record.save()
    ranks.barrier()
    if not ranks.is_main:  # the same run_id everywhere; windows go to a per-rank file
        data = trace.read_run_json(run_dir)
        record = RunRecord(run_dir, {"run_id": data["run_id"], "rank": ranks.rank, "energy_windows": []},
                           name=f"rank-{ranks.rank}.json")
    ctx = {
        "run_id": record.data["run_id"],
        "target_model": profile.models.target,
        "draft_model": profile.models.draft,
        "device": str(models.device),
        "dtype": str(models.dtype).removeprefix("torch."),
    }
    done_table = trace.read_table(run_dir)
    done = set(zip(done_table.decoder_label, done_table.prompt_id, done_table.repeat, strict=True))
    gen = profile.generation
    cells = [(spec, i, p, r) for spec in profile.decoders for i, p in enumerate(prompts) for r in range(gen.repeats)]
    owned = [c for n, c in enumerate(cells) if ranks.owns(n)]
    mine = [c for c in owned if (c[0].label, c[2].prompt_id, c[3]) not in done]
    # Rounds ordered by their place among this rank's, finished ones included: each rank alternates,
    # and a resumed run keeps every round's order.
    plan = sweep_plan(profile.decoders, mine, gen.rounds, gen.repeats,
                      owned_rounds=sorted({round_of(i, r, gen.repeats, gen.rounds) for _, i, _, r in owned}))
    eos = eos_ids(models)
    should_stop = stop_check(models.tokenizer, scorers.stop_strings(profile.prompts))
    with _progress() if show_progress and ranks.is_main else _NoProgress() as bar:
        task = bar.add_task("profile", total=len(mine), tps="-")
        for k, spec, round_, todo in plan:
            if not todo:
                continue
            tag = f"-r{ranks.rank}" if ranks.distributed else ""
            name = f"{k:02d}-{spec.label}" + ("" if round_ is None else f"-round{round_}") + tag
            sweep = f"{name}-a{_next_attempt(name, done_table.sweep[done_table.decoder_label == spec.label])}"
            draft_spec = spec.draft_spec(profile.models)
            sweep_ctx = {**ctx, "draft_model": draft_spec} if spec.draft else ctx
            _run_sweep(spec, todo, sweep, models, drafts.get(draft_spec), prompts, gen, eos, should_stop, sweep_ctx,
                       run_dir, meter, record, bar, task)
    ranks.barrier()  # every rank's rows are on disk
    if ranks.is_main:
        _merge_rank_records(run_dir, record, ranks)
        record.data.update(scorers.score_run(run_dir, profile))  # after every timed section and energy window
        record.finish()
    shutdown(ranks)
    return run_dir


def _next_attempt(name: str, sweeps) -> int:
    """The attempt number of sweep ``name``'s next attempt: one past the highest among ``sweeps``
    (the finished rows' sweep names; a recovered part counts as its attempt), so a name already on
    disk is never reused, whatever gaps earlier attempts left."""
    pattern = re.compile(rf"{re.escape(name)}-a(\d+)(-recovered)?")
    numbers = [int(m.group(1)) for s in set(sweeps) if (m := pattern.fullmatch(s))]
    return max(numbers, default=-1) + 1


def round_of(prompt_index: int, repeat: int, repeats: int, rounds: int) -> int:
    """The round of a decoder's cell: its cells, in order (each prompt's repeats, prompt after
    prompt), dealt out to ``rounds`` rounds in turn. With as many rounds as repeats, round r is
    repeat r; with one repeat, the prompts are dealt out, so every round holds a mix of them."""
    return (prompt_index * repeats + repeat) % rounds


def sweep_plan(decoders, cells: list[tuple], rounds: int, repeats: int,
               owned_rounds: list[int] | None = None) -> list[tuple]:
    """The sweeps in the order they run: ``(decoder index, spec, round, cells)``, each cell
    ``(prompt index, prompt, repeat)`` of ``cells`` ``(spec, prompt index, prompt, repeat)``.

    With one round, each decoder's cells are one sweep (round ``None``), in the profile's order.
    With more, every decoder's cells are dealt out to the rounds (``round_of``), one sweep per
    decoder and round, and the decoders run in the profile's order in the first of
    ``owned_rounds`` (the rounds this process has cells in, finished or not; by default those of
    ``cells``), in reverse in the second, and so on (ABC, CBA, ABC, ...). Why: a run takes minutes
    to hours on a machine whose clocks, temperature and neighbours drift, and the first sweep after
    loading meets a colder device than the rest; in one sweep per decoder all of that lands on
    whichever decoder runs first (the baseline, in most profiles), while alternating rounds spread
    it over every decoder alike, and mirrored pairs of rounds cancel a steady drift in each
    decoder's mean.
    """
    by_sweep: dict[tuple, list] = {}  # (label, round): its cells, in order
    for spec, i, p, r in cells:
        round_ = None if rounds == 1 else round_of(i, r, repeats, rounds)
        by_sweep.setdefault((spec.label, round_), []).append((i, p, r))
    if rounds == 1:
        return [(k, spec, None, by_sweep.get((spec.label, None), [])) for k, spec in enumerate(decoders)]
    if owned_rounds is None:
        owned_rounds = sorted({round_ for _, round_ in by_sweep})
    plan = []
    for place, round_ in enumerate(owned_rounds):
        order = list(enumerate(decoders))
        if place % 2:
            order.reverse()
        plan += [(k, spec, round_, by_sweep.get((spec.label, round_), [])) for k, spec in order]
    return plan


def _decoder_drafts(profile: Profile, models) -> dict:
    """Spec -> loaded draft for every draft a decoder of ``profile`` runs with.

    Drafts a decoder names itself (``decoders[i].draft``) load beside the
    profile's, on the device of the target's inputs (an EAGLE head on the target itself).
    """
    drafts = {profile.models.draft: models.draft} if models.draft is not None else {}
    target_spec = profile.models.target
    for spec in profile.draft_specs():
        if spec in drafts:
            continue
        if spec == target_spec:
            drafts[spec] = models.target  # the target drafting for itself: not loaded twice
            continue
        drafts[spec] = load_draft(spec, target_spec, models.target, dtype=profile.models.dtype,
                                  device=str(models.device))
    # Every decoder against its draft now, before any sweep runs (an eagle without a head,
    # a head given to specdecode, a head for another target).
    for d in profile.decoders:
        get_decoder(d.name, target=models.target, draft=drafts.get(d.draft_spec(profile.models)), **d.params)
    return drafts


def _run_sweep(spec, todo, sweep, models, draft, prompts, gen, eos, should_stop, ctx, run_dir, meter, record, bar,
               task) -> None:
    """One decoder setting over its (prompt, repeat) cells, inside one energy window.

    The window holds decoding only: each generation is journaled as it ends
    (``trace.Journal``), and its perplexity, text and table rows are made after
    the window closes, so the window's joules are the decoder's own.
    """
    decoder = get_decoder(spec.name, target=models.target, draft=draft, cuda_graphs=gen.cuda_graphs,
                          compile_model=gen.compile_model, **spec.params)
    bar.update(task, description=spec.label)
    journal = trace.Journal(run_dir, sweep.rsplit("-a", 1)[0])  # the same name in every attempt
    todo = _recover(journal, spec, decoder, todo, sweep, models, prompts, eos, ctx, run_dir, bar, task)
    if not todo:
        journal.remove()
        return
    # Kept out of the numbers and the energy window. On the longest prompt: the KV
    # cache it builds is long enough for every cell, so no cache is built (nor its
    # decode steps compiled and captured) inside the window; warmed on a short
    # prompt, a long one paid 9 s of compilation in a HumanEval window on the H200.
    longest = max((prompt for _, prompt, _ in todo), key=lambda p: p.input_ids.shape[-1])
    for w in range(gen.warmup):
        decoder.generate(longest.input_ids.to(models.device), gen.max_new_tokens,
                         torch.Generator().manual_seed(w), eos)
    decoded, tokens, seconds = [], 0, 0.0
    with measured(meter, sweep) as window:
        for index, prompt, repeat in todo:
            seed = generation_seed(gen.seed, prompt.prompt_id, repeat)
            out, time_s, ttft_s = timed_generate(decoder, prompt, gen.max_new_tokens, seed, eos, models.device,
                                                 should_stop)
            journal.append(_journal_entry(index, prompt, repeat, seed, out, time_s, ttft_s))
            decoded.append((index, prompt, repeat, seed, out, time_s, ttft_s))
            tokens, seconds = tokens + len(out.tokens), seconds + time_s
            bar.update(task, advance=1, tps=f"{tokens / seconds:.1f}")
    energy = [None] * len(decoded)
    if window:  # recorded at once, and journaled: a crash while scoring keeps the measurement
        energy = record.add_window(sweep, spec.label, window[0], [d[5] for d in decoded],
                                   sum(len(d[4].tokens) for d in decoded))
        journal.append({"energy_j": {_cell(d[1].prompt_id, d[2]): j for d, j in zip(decoded, energy, strict=True)}})
    writer = trace.SweepWriter(run_dir, sweep)
    for (index, prompt, repeat, seed, out, time_s, ttft_s), joules in zip(decoded, energy, strict=True):
        _write_row(writer, spec, decoder, models, prompt, index, repeat, seed, out, time_s, ttft_s, eos,
                   {**ctx, "sweep": sweep}, joules)
    journal.remove()


def _cell(prompt_id: str, repeat: int) -> str:
    return f"{repeat}:{prompt_id}"


def _journal_entry(index, prompt, repeat, seed, out: GenerationOutput, time_s, ttft_s) -> dict[str, Any]:
    return {"prompt_index": index, "prompt_id": prompt.prompt_id, "repeat": repeat, "seed": seed,
            "time_s": time_s, "ttft_s": ttft_s, "tokens": out.tokens.tolist(),
            "steps": [[s.drafted, s.accepted, s.committed] for s in out.steps],
            "target_forwards": out.target_forwards, "draft_forwards": out.draft_forwards,
            "phase_times_s": out.phase_times_s}


def _recover(journal, spec, decoder, todo, sweep, models, prompts, eos, ctx, run_dir, bar, task) -> list:
    """Rows for the cells an interrupted attempt decoded but did not write; returns the cells left.

    They go to a part of their own, with their share of their sweep's energy
    when its window closed before the crash (journaled then).
    """
    logged = journal.entries()
    entries = {(e["prompt_id"], e["repeat"]): e for e in logged if "prompt_id" in e}
    energy = {k: j for e in logged for k, j in e.get("energy_j", {}).items()}
    left, writer = [], None
    for index, prompt, repeat in todo:
        e = entries.get((prompt.prompt_id, repeat))
        if e is None or e["prompt_index"] != index:
            left.append((index, prompt, repeat))
            continue
        out = GenerationOutput(tokens=torch.tensor(e["tokens"], dtype=torch.long),
                               steps=tuple(StepRecord(*s) for s in e["steps"]), target_forwards=e["target_forwards"],
                               draft_forwards=e["draft_forwards"], phase_times_s=e["phase_times_s"])
        writer = writer or trace.SweepWriter(run_dir, f"{sweep}-recovered")
        _write_row(writer, spec, decoder, models, prompt, index, repeat, e["seed"], out, e["time_s"], e["ttft_s"],
                   eos, {**ctx, "sweep": writer.sweep}, energy.get(_cell(prompt.prompt_id, repeat)))
        bar.update(task, advance=1)
    return left


def _write_row(writer, spec, decoder, models, prompt, index, repeat, seed, out, time_s, ttft_s, eos, ctx,
               joules) -> None:
    """Score one decoded generation (output perplexity, text) and write its rows."""
    ppl = output_perplexity(models.target, prompt.input_ids, out.tokens)
    text = models.tokenizer.decode(out.tokens, skip_special_tokens=True)
    row = generation_row(ctx, spec, decoder, prompt, index, repeat, seed, out, time_s, ttft_s, ppl, text, eos)
    writer.add(trace.with_energy(row, joules), out.steps)


def _merge_rank_records(run_dir: Path, record: RunRecord, ranks: Ranks) -> None:
    """Fold the other ranks' energy windows into run.json, with per-rank totals."""
    windows = [{**w, "rank": w.get("rank", 0)} for w in record.data.get("energy_windows", [])]
    for path in sorted(run_dir.glob("rank-*.json")):
        extra = json.loads(path.read_text())
        seen = {w["sweep"] for w in windows}
        windows += [{**w, "rank": extra["rank"]} for w in extra.get("energy_windows", []) if w["sweep"] not in seen]
    record.data["energy_windows"] = windows
    per_rank: dict[int, float] = {}
    for w in windows:
        per_rank[w["rank"]] = per_rank.get(w["rank"], 0.0) + w["total_energy_j"]
    record.data["energy_by_rank_j"] = {str(r): j for r, j in sorted(per_rank.items())}
    record.data["world_size"] = max(ranks.world_size, record.data.get("world_size", 1))


class _NoProgress:
    """Stand-in for a progress bar when none is wanted."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        return None
