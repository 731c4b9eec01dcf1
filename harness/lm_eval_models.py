"""lm-evaluation-harness models backed by this project's decoders.

``lm_eval --model decoding --model_args decoder=NAME,pretrained=TARGET,...`` serves
every registered decoder (and ``decoder=module.path:ClassName`` for one outside
this project); ``--model NAME`` is the same for a registered ``NAME``, e.g.
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

import difflib
import hashlib
import inspect
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

from decoders import available_decoders, check_execution_settings, decoder_class, decoder_params, get_decoder
from harness import trace
from harness.energy import EnergyMeter, gpu_indices_for, measured
from harness.models import load_models, resolve_specs
from harness.profile_spec import DecoderSpec
from harness.prompts import Prompt, stop_check
from harness.quality import output_perplexity
from harness.run_record import RunRecord
from harness.runner import eos_ids, generation_row, generation_seed, timed_generate


def _output_path_from_argv(argv: list[str]) -> str | None:
    """lm_eval's ``--output_path`` (models are not told it, so read it from the command line)."""
    for i, arg in enumerate(argv):
        if arg in ("--output_path", "-o") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--output_path="):
            return arg.split("=", 1)[1]
    return None


class ModelArgsError(ValueError):
    """Bad ``--model_args``: printed as one line (no traceback) when nothing catches it."""


def _one_line_excepthook(previous):
    def hook(kind, err, tb):
        if isinstance(err, ModelArgsError):
            print(f"lm_eval: error: {err}", file=sys.stderr)
        else:
            previous(kind, err, tb)

    return hook


def _refuse(message: str) -> ModelArgsError:
    """A ``ModelArgsError``; the command line prints it as one line if nothing catches it."""
    if not getattr(sys.excepthook, "_decoding_harness", False):
        sys.excepthook = _one_line_excepthook(sys.excepthook)
        sys.excepthook._decoding_harness = True
    return ModelArgsError(message)


class DecodingLM(HFLM):
    """``--model decoding``: any registered decoder, chosen with ``decoder=NAME`` in ``--model_args``."""

    #: Set by the per-name classes (``--model mtad``); ``None`` for ``--model decoding``.
    decoder_name: str | None = None

    def __init__(
        self,
        pretrained: str,
        decoder: str | None = None,
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
        compile_model: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self.decoder_name = self._choose_decoder(decoder)
        try:
            cls = decoder_class(self.decoder_name)
            self.execution = {"cuda_graphs": cuda_graphs, "compile_model": compile_model}
            check_execution_settings(**self.execution)  # before any model loads
            known = decoder_params(self.decoder_name)
            self.decoder_kwargs = {k: cls.check_param(k, kwargs.pop(k)) for k in list(kwargs) if k in known}
            cls.Params(**self.decoder_kwargs)  # rules between parameters
            self._check_unknown(kwargs, cls)
            cls.check_draft(bool(draft), "--model_args ...,draft=MODEL" if cls.needs_draft else "drop draft=")
        except (TypeError, ValueError) as err:
            raise _refuse(f"--model {self.decoder_name}: {err}") from None
        if str(batch_size) not in ("1", "auto"):
            print(f"{self.decoder_name}: decoding runs one request at a time; batch_size {batch_size} "
                  "applies to log-likelihood requests only", file=sys.stderr)
        try:
            resolve_specs(pretrained, draft)  # before accelerate starts the process group
        except (FileNotFoundError, ValueError) as err:
            raise _refuse(f"--model {self.decoder_name}: {err}") from None
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
        self._warmed_length = 0  # prompt + new tokens of the longest warm-up so far
        self._record: RunRecord | None = None

    def _choose_decoder(self, decoder: str | None) -> str:
        if self.decoder_name is not None:
            if decoder not in (None, self.decoder_name):
                raise _refuse(f"--model {self.decoder_name} runs decoder {self.decoder_name!r}; drop decoder="
                              f"{decoder} or use --model decoding")
            return self.decoder_name
        if not decoder:
            raise _refuse(f"--model decoding needs decoder=NAME in --model_args; known decoders: "
                          f"{', '.join(available_decoders())} (or module.path:ClassName)")
        try:
            decoder_class(decoder)
        except ValueError as err:
            raise _refuse(str(err)) from None
        return decoder

    @staticmethod
    def _check_unknown(kwargs: dict[str, Any], cls) -> None:
        """Refuse model_args that neither the decoder, this adapter, nor lm-eval's HFLM takes."""
        hflm = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
        ours = set(inspect.signature(DecodingLM.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(kwargs) - hflm)
        if unknown:
            known = sorted(ours | set(decoder_params(cls.name)) | hflm)
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown model_args {', '.join(unknown)}{hint} (decoder {cls.name!r} takes: "
                             f"{', '.join(decoder_params(cls.name))})")

    # -- generation ---------------------------------------------------------

    def _decoder(self, kwargs: dict[str, Any]):
        params = dict(self.decoder_kwargs)
        params["temperature"] = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        for key in ("top_k", "top_p"):
            if key in kwargs:
                params[key] = kwargs[key]
        draft = self.models.draft if decoder_class(self.decoder_name).needs_draft else None
        return get_decoder(self.decoder_name, target=self.models.target, draft=draft, **self.execution, **params)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        eos = eos_ids(self.models)
        device = self.models.device
        self._calls += 1
        sweep = f"{self._calls:02d}-{self.decoder_name}" + (f"-r{self.rank}" if self.world_size > 1 else "")
        writer = trace.SweepWriter(self.trace_dir, sweep) if self.trace_dir else None
        if writer is not None and self._record is None:
            self._record = self._start_record()
        results, decoded = [], []
        jobs = [self._job(index, request, eos_text) for index, request in enumerate(requests)]
        def cache_length(job) -> int:  # what a request's KV cache must hold: prompt + new tokens
            return job[0].input_ids.shape[-1] + job[2]

        longest = max(jobs, key=cache_length, default=None)
        if longest and cache_length(longest) > self._warmed_length and (
                self.meter is not None or writer is not None):
            # Compiling and capturing the decode steps happens outside every window
            # and trace (as harness profile's warm-up does), on the request needing the
            # longest cache: every other request reuses that cache and its steps.
            prompt, decoder, max_gen, until = longest
            timed_generate(decoder, prompt, max_gen, 0, eos, device, stop_check(self.tokenizer, until))
            self._warmed_length = cache_length(longest)
        # The window holds decoding only; perplexity and trace rows come after it.
        with measured(self.meter, sweep) as window:
            for (prompt, decoder, max_gen, until), request in zip(
                    tqdm(jobs, disable=disable_tqdm or self.rank != 0, desc=f"{self.decoder_name} generate_until"),
                    requests, strict=True):
                seed = generation_seed(self.seed, hashlib.sha256(prompt.text.encode()).hexdigest(), 0)
                out, time_s, ttft_s = timed_generate(decoder, prompt, max_gen, seed, eos, device,
                                                     stop_check(self.tokenizer, until))
                text = postprocess_generated_text(self.tok_decode(out.tokens.tolist()), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", request.args, text)
                decoded.append((prompt, decoder, seed, out, time_s, ttft_s, text))
        if writer is not None:
            for index, (prompt, decoder, seed, out, time_s, ttft_s, text) in enumerate(decoded):
                ppl = output_perplexity(self.models.target, prompt.input_ids, out.tokens)
                spec = DecoderSpec(self.decoder_name, self.decoder_name, decoder.params)
                row = generation_row(self._ctx(sweep), spec, decoder, prompt, index, 0, seed, out, time_s,
                                     ttft_s, ppl, text, eos)
                writer.add(row, out.steps)
        if window:
            print(f"{self.decoder_name}: {window[0].total_j:.1f} J over {window[0].time_s:.2f} s "
                  f"({window[0].mean_power_w:.0f} W)", file=sys.stderr)
            if writer is not None:
                writer.set_energy(self._record.add_window(writer.sweep, self.decoder_name, window[0], writer.times_s,
                                                          writer.new_tokens))
        if self._record is not None:
            self._record.finish()
        return results

    def _job(self, index: int, request, eos_text: str):
        """``(prompt, decoder, max_gen, until)`` of one ``generate_until`` request."""
        context, gen_kwargs = request.args
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen = int(kwargs.pop("max_gen_toks"))
        ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen)
        task = getattr(request, "task_name", None)
        doc = getattr(request, "doc_id", None)
        pid = f"{task}/{doc}" if task is not None else f"req{index:05d}"
        return Prompt(pid, context, torch.tensor([ids], dtype=torch.long)), self._decoder(kwargs), max_gen, until

    # -- traces --------------------------------------------------------------

    def _ctx(self, sweep: str) -> dict[str, Any]:
        return {"run_id": self._record.data["run_id"], "sweep": sweep, "target_model": self.models.target_spec,
                "draft_model": self.models.draft_spec, "device": str(self.models.device),
                "dtype": str(self.models.dtype).removeprefix("torch.")}

    def _start_record(self) -> RunRecord:
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        dtype = str(self.models.dtype).removeprefix("torch.")
        profile = {
            "name": f"lm_eval-{self.decoder_name}",
            "models": {"target": self.models.target_spec, "draft": self.models.draft_spec,
                       "dtype": dtype, "device": str(self.models.device)},
            "generation": {"max_new_tokens": None, "repeats": 1, "warmup": 0, "seed": self.seed, **self.execution},
            "decoders": [{"name": self.decoder_name, "label": self.decoder_name, "params": self.decoder_kwargs}],
        }
        return RunRecord.start(self.trace_dir, run_id=f"lm_eval-{self.decoder_name}-{int(time.time())}",
                               source="lm_eval", profile=profile, fingerprint=None, energy=self.meter is not None,
                               models=self.models, world_size=self.world_size, rank=self.rank)

    def get_model_info(self) -> dict:
        return {"decoder": self.decoder_name, "decoder_params": self.decoder_kwargs,
                "target": self.models.target_spec, "draft": self.models.draft_spec,
                "trace_dir": str(self.trace_dir) if self.trace_dir else None}


def lm_class(name: str, class_name: str | None = None) -> type[DecodingLM]:
    """The lm-eval model class of decoder ``name`` (what ``--model NAME`` resolves to)."""
    if name not in _BY_NAME:
        decoder_class(name)  # unknown names fail here, with suggestions
        title = class_name or "".join(p.title() for p in name.replace(".", "_").replace(":", "_").split("_")) + "LM"
        _BY_NAME[name] = type(title, (DecodingLM,), {
            "decoder_name": name, "__doc__": f"``--model {name}``: decoding with this project's {name!r}.",
            "__module__": __name__})
    return _BY_NAME[name]


_BY_NAME: dict[str, type[DecodingLM]] = {}
#: Prefix of the attributes that lm-eval's lazy registry entries name (``module:for_NAME``).
LAZY_PREFIX = "for_"


def __getattr__(attr: str):
    # lm-eval's registry resolves "harness.lm_eval_models:for_NAME" by getattr on this module.
    if attr.startswith(LAZY_PREFIX):
        return lm_class(attr[len(LAZY_PREFIX):])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


# The first three methods keep the class names they have always had (imports and results name them).
SamplingLM = lm_class("sampling", "SamplingLM")
SpecDecodeLM = lm_class("specdecode", "SpecDecodeLM")
MTADLM = lm_class("mtad", "MTADLM")
