"""lm-evaluation-harness models backed by this project's decoders.

``lm_eval --model mtad --model_args pretrained=TARGET,draft=DRAFT,gamma=4,...``.
Log-likelihood requests (multiple choice, perplexity) go to lm-eval's unchanged
``HFLM`` implementation; only ``generate_until`` runs our decoders, one request
at a time (the assisted decoders are batch-1), honouring the task's ``until``,
``max_gen_toks`` and ``do_sample``/``temperature`` (and ``top_k``/``top_p`` when
the task sets them; otherwise the model_args' values).

Extra model_args: ``draft``, the decoder's parameters, ``dtype``, ``device``,
``seed`` (per-request seeds derive from it and the request's text),
``energy=True`` (one Zeus window over each ``generate_until`` call) and
``trace_dir`` (per-request Parquet traces in ``harness profile``'s schema;
defaults to ``<--output_path>/decoding-traces/<model>-<time>`` when lm_eval was
given ``--output_path``).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from decoders import check_execution_settings, decoder_class, decoder_params, get_decoder
from harness import trace
from harness.energy import EnergyMeter, gpu_indices_for
from harness.models import load_models, resolve_specs
from harness.profile_spec import DecoderSpec
from harness.prompts import Prompt
from harness.quality import output_perplexity
from harness.runner import RunRecord, _now, eos_ids, generation_row, generation_seed, timed_generate
from harness.sysinfo import environment


def _output_path_from_argv(argv: list[str]) -> str | None:
    """lm_eval's ``--output_path`` (models are not told it, so read it from the command line)."""
    for i, arg in enumerate(argv):
        if arg in ("--output_path", "-o") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--output_path="):
            return arg.split("=", 1)[1]
    return None


class _DecodingLM(HFLM):
    decoder_name = ""

    def __init__(
        self,
        pretrained: str,
        draft: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        seed: int = 1234,
        energy: bool = False,
        trace_dir: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        parallelize: bool = False,
        cuda_graphs: bool = True,
        compile_model: bool = False,
        **kwargs: Any,
    ) -> None:
        self.execution = {"cuda_graphs": cuda_graphs, "compile_model": compile_model}
        check_execution_settings(**self.execution)  # before any model loads
        known = decoder_params(self.decoder_name)
        self.decoder_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in known}
        for key, value in self.decoder_kwargs.items():
            decoder_class(self.decoder_name).check_param(key, value)
        needs_draft = decoder_class(self.decoder_name).needs_draft
        if needs_draft and not draft:
            raise ValueError(f"--model {self.decoder_name} needs a draft: --model_args pretrained=...,draft=...")
        if not needs_draft and draft:
            raise ValueError(f"--model {self.decoder_name} takes no draft; drop draft= from --model_args")
        if str(batch_size) not in ("1", "auto"):
            print(f"{self.decoder_name}: decoding runs one request at a time; batch_size {batch_size} "
                  "applies to log-likelihood requests only", file=sys.stderr)
        resolve_specs(pretrained, draft)  # before accelerate starts the process group
        accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Data parallel (accelerate launch / torchrun): lm-eval shards requests by
            # rank; each process decodes its share on its own device.
            from accelerate import Accelerator
            from accelerate.utils import InitProcessGroupKwargs

            accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # gloo between CPU processes
                                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
            if not parallelize:
                device = str(accelerator.device)
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's CLI passes --device cuda:0 unless told otherwise; do as its HFLM does.
            print(f"{self.decoder_name}: no CUDA GPU, running on the CPU", file=sys.stderr)
            device = "cpu"
        # parallelize=True splits the target over all visible GPUs, as lm-eval's hf model does.
        models = load_models(pretrained, draft, dtype=dtype, device=device or "auto",
                             device_map="auto" if parallelize else None)
        super().__init__(pretrained=models.target, tokenizer=models.tokenizer, batch_size=batch_size,
                         max_batch_size=max_batch_size or 64, **kwargs)
        if accelerator is not None:
            # HFLM treats a ready-made model as single-process; restore the real topology.
            self.accelerator = accelerator
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        self.models = models
        self.seed = int(seed)
        self.meter = EnergyMeter(gpu_indices_for(models.devices)) if energy else None
        out = trace_dir or _output_path_from_argv(sys.argv)
        if out and not trace_dir:
            base = Path(out)
            base = base.parent if base.suffix == ".json" else base
            stamp = [time.strftime("%Y%m%dT%H%M%S")]
            if accelerator is not None:  # every rank writes into rank 0's folder
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(stamp, from_process=0)
            out = str(base / "decoding-traces" / f"{self.decoder_name}-{stamp[0]}")
        self.trace_dir = Path(out) if out else None
        self._calls = 0
        self._record: RunRecord | None = None

    # -- generation ---------------------------------------------------------

    def _decoder(self, kwargs: dict[str, Any]):
        params = dict(self.decoder_kwargs)
        params["temperature"] = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        for key in ("top_k", "top_p"):
            if key in kwargs:
                params[key] = kwargs[key]
        draft = self.models.draft if decoder_class(self.decoder_name).needs_draft else None
        return get_decoder(self.decoder_name, target=self.models.target, draft=draft, **self.execution, **params)

    def _stop_check(self, until: list[str]):
        stops = [s for s in until if s]
        longest = max((len(s) for s in stops), default=0)

        def should_stop(tokens: list[int]) -> bool:
            # Decoding a short tail is enough to see any stop string that just appeared.
            tail = self.tokenizer.decode(tokens[-(longest + 8):], skip_special_tokens=False)
            return any(s in tail for s in stops)

        return should_stop if stops else None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        eos = eos_ids(self.models)
        device = self.models.device
        self._calls += 1
        sweep = f"{self._calls:02d}-{self.decoder_name}" + (f"-r{self.rank}" if self.world_size > 1 else "")
        writer = trace.SweepWriter(self.trace_dir, sweep) if self.trace_dir else None
        if writer is not None and self._record is None:
            self._record = self._start_record()
        results = []
        if self.meter:
            self.meter.begin(sweep)
        try:
            for index, request in enumerate(tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                                 desc=f"{self.decoder_name} generate_until")):
                context, gen_kwargs = request.args
                kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_gen = int(kwargs.pop("max_gen_toks"))
                ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
                task = getattr(request, "task_name", None)
                doc = getattr(request, "doc_id", None)
                pid = f"{task}/{doc}" if task is not None else f"req{index:05d}"
                prompt = Prompt(pid, context, torch.tensor([ids], dtype=torch.long))
                decoder = self._decoder(kwargs)
                seed = generation_seed(self.seed, hashlib.sha256(context.encode()).hexdigest(), 0)
                out, time_s, ttft_s = timed_generate(decoder, prompt, max_gen, seed, eos, device,
                                                     self._stop_check(until))
                text = postprocess_generated_text(self.tok_decode(out.tokens.tolist()), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                if writer is not None:
                    ppl = output_perplexity(self.models.target, prompt.input_ids, out.tokens)
                    spec = DecoderSpec(self.decoder_name, self.decoder_name, decoder.params)
                    row = generation_row(self._ctx(sweep), spec, decoder, prompt, index, 0, seed, out, time_s,
                                         ttft_s, ppl, text, eos)
                    writer.add(row, out.steps)
        except BaseException:
            if self.meter:
                self.meter.cancel(sweep)
            raise
        if self.meter:
            window = self.meter.end(sweep)
            print(f"{self.decoder_name}: {window.total_j:.1f} J over {window.time_s:.2f} s "
                  f"({window.mean_power_w:.0f} W)", file=sys.stderr)
            if writer is not None:
                self._record.add_window(writer, self.decoder_name, window)
        if self._record is not None:
            self._record.data.update(status="complete", ended=_now())
            self._record.save()
        return results

    # -- traces --------------------------------------------------------------

    def _ctx(self, sweep: str) -> dict[str, Any]:
        return {"run_id": self._record.data["run_id"], "sweep": sweep, "target_model": self.models.target_spec,
                "draft_model": self.models.draft_spec, "device": str(self.models.device),
                "dtype": str(self.models.dtype).removeprefix("torch.")}

    def _start_record(self) -> RunRecord:
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        profile = {
            "name": f"lm_eval-{self.decoder_name}",
            "models": {"target": self.models.target_spec, "draft": self.models.draft_spec,
                       "dtype": str(self.models.dtype).removeprefix("torch."), "device": str(self.models.device)},
            "generation": {"max_new_tokens": None, "repeats": 1, "warmup": 0, "seed": self.seed, **self.execution},
            "decoders": [{"name": self.decoder_name, "label": self.decoder_name, "params": self.decoder_kwargs}],
        }
        name = trace.RUN_JSON if self.rank == 0 else f"rank-{self.rank}.json"
        return RunRecord(self.trace_dir, {
            "run_id": f"lm_eval-{self.decoder_name}-{int(time.time())}", "status": "running", "source": "lm_eval",
            "command": sys.argv, "fingerprint": None, "profile": profile, "energy": self.meter is not None,
            "started": _now(), "ended": None, "environment": environment([self.models.device]),
            "model_info": {"dtype": profile["models"]["dtype"], "device": profile["models"]["device"]},
            "energy_windows": [], "rank": self.rank, "world_size": self.world_size,
        }, name=name)

    def get_model_info(self) -> dict:
        return {"decoder": self.decoder_name, "decoder_params": self.decoder_kwargs,
                "target": self.models.target_spec, "draft": self.models.draft_spec,
                "trace_dir": str(self.trace_dir) if self.trace_dir else None}


class SamplingLM(_DecodingLM):
    """``--model sampling``: autoregressive decoding through this project's loop."""

    decoder_name = "sampling"


class SpecDecodeLM(_DecodingLM):
    """``--model specdecode``: exact speculative sampling."""

    decoder_name = "specdecode"


class MTADLM(_DecodingLM):
    """``--model mtad``: multi-token assisted decoding."""

    decoder_name = "mtad"
