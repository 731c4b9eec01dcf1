"""First process of a sample's namespaces (``harness.code_exec``, level ``namespace``).

Started by ``unshare --mount --pid --fork`` as root with ``python -I -S``, so it
imports the standard library only. It covers every world-writable folder with a
private tmpfs that only root may write (the sample's own folder is one in /tmp),
hides /root (re-exposing the interpreter read-only if it lives there), then runs
the sample as an unprivileged uid and reaps every process of the namespace until
the sample exits. When this process exits, the kernel kills whatever is left in
the namespace, and the tmpfs mounts vanish with it.
"""

import ctypes
import json
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
HIDDEN = ("/root",)

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _bind_ro(source: str, target: str) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(source, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def main() -> int:
    cfg = json.loads(sys.argv[1])
    uid, work, prefix = cfg["uid"], cfg["work"], cfg["prefix"]
    with open(os.path.join(work, "program.py"), "rb") as fh:  # before /tmp is covered
        program = fh.read()
    # Root-owned and not world-writable: the sample can write in its own folder only.
    tmpfs = f"size={cfg['tmpfs_bytes']},mode=0755"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    hidden_prefix = any(prefix == h or prefix.startswith(h + "/") for h in HIDDEN)
    if hidden_prefix:
        os.mkdir("/tmp/.prefix", 0o755)
        _bind_ro(prefix, "/tmp/.prefix")
    for path in WRITABLE[1:]:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    for path in HIDDEN:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    if hidden_prefix:
        os.makedirs(prefix, exist_ok=True)
        _bind_ro("/tmp/.prefix", prefix)
    home = "/tmp/work"
    os.mkdir(home, 0o700)
    os.chown(home, uid, uid)
    with open(os.path.join(home, "program.py"), "wb") as fh:
        fh.write(program)
    nonce_fd = cfg["nonce_fd"]
    pid = os.fork()
    if pid == 0:
        try:
            os.closerange(3, nonce_fd)
            os.closerange(nonce_fd + 1, 65536)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.chdir(home)
            env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
            os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-c", cfg["wrapper"], *cfg["args"]], env)
        finally:
            os._exit(127)
    os.close(nonce_fd)
    while True:  # as the namespace's init, reap every orphan until the sample itself ends
        try:
            done, status = os.wait()
        except ChildProcessError:
            return 1
        if done == pid:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main())
