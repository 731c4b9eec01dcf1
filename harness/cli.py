"""The ``harness`` command line."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape


def _stdout_console() -> Console:
    # Rich assumes 80 columns when piped (CI logs, tests); tables need more.
    return Console() if sys.stdout.isatty() else Console(width=140)


def _err_console() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def _quiet_transformers() -> None:
    # Loading bars from transformers would interleave with the run's own bar.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _error(message: str) -> int:
    """Print one ``error:`` line; return the bad-input exit code."""
    _err_console().print(f"[red]error:[/red] {escape(message)}")
    return 2


def _interrupted(args: argparse.Namespace, run_dir: Path) -> int:
    """Ctrl-C during ``harness profile``: say what is kept and how to complete it."""
    from harness import trace

    if not (run_dir / trace.RUN_JSON).is_file():
        message = f"interrupted before the run started; nothing was written to {run_dir}"
    else:
        try:
            kept = f"{len(trace.read_table(run_dir))} generation(s) are saved in {run_dir}"
        except trace.CorruptRunError as err:
            kept = str(err)
        command = shlex.join(["harness", "profile", args.profile, "-o", str(run_dir), "--resume",
                              *[a for item in args.set for a in ("--set", item)]])
        message = f"interrupted: {kept}; complete the run with: {command}"
    _err_console().print(f"[yellow]{escape(message)}[/yellow]")
    return 130


def cmd_profile(args: argparse.Namespace) -> int:
    from harness.energy import EnergyUnavailableError
    from harness.profile_spec import ProfileError, load_profile
    from harness.runner import RunDirError, default_run_dir, run_profile

    console = _err_console()
    try:
        profile = load_profile(args.profile, args.set)
    except ProfileError as err:
        return _error(str(err))
    for warning in profile.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    run_dir = Path(args.output) if args.output else default_run_dir(profile)
    _quiet_transformers()
    try:
        run_profile(profile, run_dir, energy=args.energy, resume=args.resume, show_progress=not args.no_progress,
                    confirm_run_unsafe_code=args.confirm_run_unsafe_code)
    except (RunDirError, EnergyUnavailableError, FileNotFoundError, ValueError, OSError) as err:
        return _error(str(err))
    except KeyboardInterrupt:
        return _interrupted(args, run_dir)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 summarises the whole run
    from harness.summary import print_summary

    console = _stdout_console()
    print_summary(run_dir, console)
    if not args.no_report:
        from harness.outputs import OutputPathError
        from harness.report import render_report

        try:
            console.print(f"report: {render_report([run_dir], run_dir / 'report.html')}")
        except (OutputPathError, OSError) as err:
            # The run is complete; only its HTML view is missing.
            _err_console().print(
                f"[yellow]warning:[/yellow] {escape(str(err))}. The run is complete and its traces in {run_dir} are "
                f"fine; render the report elsewhere with: harness report {run_dir} -o FILE.html")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.outputs import OutputPathError
    from harness.report import render_report
    from harness.trace import CorruptRunError

    try:
        out = render_report(args.runs, args.output, title=args.title)
    except (FileNotFoundError, CorruptRunError, OutputPathError) as err:
        return _error(str(err))
    print(f"report written to {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.compare import CompareInputError, compare_runs, to_html, to_markdown
    from harness.outputs import OutputPathError, check_output_file, write_output_file

    try:
        if args.output:
            check_output_file(args.output)
        result = compare_runs(args.baseline, args.current, args.max_slowdown, args.checks, args.allow_partial)
        text = to_markdown(result) if args.format == "md" else to_html(result)
        if args.output:
            write_output_file(args.output, text.encode())
    except (CompareInputError, OutputPathError) as err:
        return _error(str(err))
    if args.format == "md" or not args.output:
        print(text)
    return 1 if result.regressed else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lm_eval.__main__ import cli_evaluate

    import decoding_harness_lm_eval  # noqa: F401  (registers the models even without the .pth file)
    from harness.lm_eval_models import ModelArgsError

    sys.argv = ["lm_eval", *args.lm_eval_args]
    try:
        cli_evaluate()
    except ModelArgsError as err:
        _err_console().print(f"[red]error:[/red] {escape(str(err))}")
        return 2
    return 0


def cmd_decoders(args: argparse.Namespace) -> int:
    """List every registered decoder with its parameters, read from their declarations."""
    from rich.table import Table

    from decoders import available_decoders, decoder_class, decoder_param_info, decoder_params

    names = args.names or available_decoders()
    console = _stdout_console()
    for name in names:
        try:
            cls = decoder_class(name)
        except ValueError as err:
            _err_console().print(f"[red]error:[/red] {escape(str(err))}")
            return 2
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        table = Table(title=f"{name}{' (needs a draft model)' if cls.needs_draft else ''}: {doc}",
                      title_justify="left")
        for column in ("parameter", "default", "accepts", "meaning"):
            table.add_column(column)
        defaults = decoder_params(name)
        for key, info in decoder_param_info(name).items():
            table.add_row(key, repr(defaults[key]), info.describe(), info.doc)
        console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness", description="Benchmark LLM decoding methods on speed, energy and output quality."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="run a profile's decoders side by side and write Parquet traces")
    p.add_argument("profile", help="profile YAML (see profiles/)")
    p.add_argument("--energy", action="store_true", help="measure GPU energy with Zeus (NVIDIA GPUs only)")
    p.add_argument("-o", "--output", help="run directory (default: runs/<profile name>-<fingerprint>)")
    p.add_argument("--resume", action="store_true", help="complete an interrupted run in the run directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile value, e.g. --set generation.max_new_tokens=16 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help="do not write report.html into the run directory")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow a prompts.scorer that runs model-written code (e.g. humaneval)")
    p.set_defaults(func=cmd_profile)

    r = sub.add_parser("report", help="render one self-contained HTML report from run directories")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR")
    r.add_argument("-o", "--output", default="report.html", help="HTML file to write (default: report.html)")
    r.add_argument("--title", default="Decoding benchmark report")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("compare", help="regression gate: compare a current run with a baseline run",
                       description="Exit code 0: no regression; 1: regression; 2: bad input (a run missing, "
                                   "corrupt, not comparable, incomplete, or missing generations the baseline has).")
    c.add_argument("baseline", metavar="BASELINE_RUN")
    c.add_argument("current", metavar="CURRENT_RUN")
    c.add_argument("--max-slowdown", type=float, default=0.05,
                   help="allowed slowdown (and energy increase) as a fraction (default 0.05)")
    c.add_argument("--checks", choices=["all", "deterministic", "timing"], default="all",
                   help="deterministic: tokens, acceptance counts, perplexity; timing: time and energy per token")
    c.add_argument("--format", choices=["md", "html"], default="md")
    c.add_argument("-o", "--output", help="also write the summary to this file")
    c.add_argument("--allow-partial", action="store_true",
                   help="compare an incomplete run, or one missing generations of the baseline, on what both "
                        "runs hold (the summary says how much that is) instead of refusing it")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("decoders", help="list the decoders and their parameters")
    d.add_argument("names", nargs="*", metavar="NAME", help="only these (registered names or module:Class)")
    d.set_defaults(func=cmd_decoders)

    e = sub.add_parser("eval", help="lm-evaluation-harness with this project's models (same flags as lm_eval)",
                       description="Runs lm_eval with every decoder registered as a model (--model decoding "
                                   "--model_args decoder=NAME,..., or --model NAME), e.g. harness eval --model mtad "
                                   "--model_args pretrained=T,draft=D --tasks harness_capitals --include_path tasks")
    e.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"] and not {"-h", "--help"} & set(argv[1:2]):
        # argparse cannot pass option-like arguments through to lm_eval untouched.
        return cmd_eval(argparse.Namespace(lm_eval_args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # report, compare, or a profile's summary: nothing to complete
        _err_console().print("[yellow]interrupted[/yellow]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
