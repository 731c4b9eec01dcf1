"""Joining a GGUF file from data-only wheels: md5-checked, atomic, never a half file."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from harness import gguf_parts
from harness.gguf_parts import JoinError, PartedGGUF, PartsMissingError, ensure_joined, is_verified

PARTS = [b"GGUF" + bytes(range(60)), bytes(range(200)) * 3, b"tail-bytes"]
WHOLE = b"".join(PARTS)


def _model(md5: str | None = None, size: int | None = None) -> PartedGGUF:
    return PartedGGUF(spec="builtin:fake-parted", file_name="fake.gguf", module="fake_gguf_part{n}",
                      data_file="data/part{n:02d}.bin", distribution="fake-gguf-part{n}", version="0.1",
                      parts=len(PARTS), size_bytes=len(WHOLE) if size is None else size,
                      md5=md5 or hashlib.md5(WHOLE).hexdigest(), setup_hint="bash scripts/setup.sh --fake")


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Fake part packages on sys.path, laid out as the wheels install them."""
    site = tmp_path / "site"
    for n, data in enumerate(PARTS, 1):
        pkg = site / f"fake_gguf_part{n}"
        (pkg / "data").mkdir(parents=True)
        # Importing a part would fail loudly: the join must only locate the files.
        (pkg / "__init__.py").write_text("raise RuntimeError('a data wheel was imported')\n")
        (pkg / "data" / f"part{n:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    yield site
    for n in range(1, len(PARTS) + 1):
        sys.modules.pop(f"fake_gguf_part{n}", None)


def test_join_writes_the_verified_file_without_importing_the_parts(installed, tmp_path):
    dest = ensure_joined(_model(), tmp_path / "cache")
    assert dest.read_bytes() == WHOLE
    assert is_verified(dest, _model())
    assert not any(f"fake_gguf_part{n}" in sys.modules for n in range(1, 4))
    assert sorted(p.name for p in dest.parent.iterdir()) == ["fake.gguf", "fake.gguf.verified"]


def test_verified_file_is_reused_without_the_parts(installed, tmp_path, monkeypatch):
    dest = ensure_joined(_model(), tmp_path / "cache")
    monkeypatch.setattr(gguf_parts, "locate_parts", lambda m: pytest.fail("parts read again"))
    monkeypatch.setattr(gguf_parts, "file_md5", lambda p: pytest.fail("verified file hashed again"))
    assert ensure_joined(_model(), tmp_path / "cache") == dest


def test_corrupt_joined_file_is_detected_and_rebuilt(installed, tmp_path):
    dest = ensure_joined(_model(), tmp_path / "cache")
    with dest.open("r+b") as fh:
        fh.seek(10)
        fh.write(b"\xff")
    st = dest.stat()  # a write moves the mtime (set here: the clock may not have ticked since the join)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not is_verified(dest, _model())
    assert ensure_joined(_model(), tmp_path / "cache").read_bytes() == WHOLE


def test_partial_join_is_ignored_and_rebuilt(installed, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(WHOLE[:50])  # a truncated copy, e.g. an interrupted transfer
    (cache / ".fake.gguf.join-abc").write_bytes(WHOLE[:20])  # an abandoned temporary join
    old = os.path.getmtime(cache / ".fake.gguf.join-abc") - 2 * gguf_parts.STALE_TMP_S
    os.utime(cache / ".fake.gguf.join-abc", (old, old))
    assert ensure_joined(_model(), cache).read_bytes() == WHOLE
    assert not (cache / ".fake.gguf.join-abc").exists()


def test_hand_placed_correct_file_is_accepted_after_one_hash(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(WHOLE)  # e.g. the GPU carry's assemble.sh; no parts installed
    assert ensure_joined(_model(), cache).read_bytes() == WHOLE
    assert is_verified(cache / "fake.gguf", _model())


def test_md5_mismatch_is_refused_and_nothing_is_left(installed, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(JoinError, match=r"md5 [0-9a-f]{32}, expected 0{32}; nothing was loaded.*--force-reinstall"):
        ensure_joined(_model(md5="0" * 32), cache)
    assert list(cache.iterdir()) == []


def test_wrong_total_size_is_refused_before_joining(installed, tmp_path):
    with pytest.raises(JoinError, match=f"add up to {len(WHOLE):,} bytes, expected 5"):
        ensure_joined(_model(size=5), tmp_path / "cache")


def test_missing_parts_give_one_error_naming_the_setup_option(installed, tmp_path):
    (installed / "fake_gguf_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(PartsMissingError, match=r"builtin:fake-parted is not set up: 1 of its 3 data wheels are "
                                                r"not installed \(fake-gguf-part2\)\. Install them with "
                                                r"bash scripts/setup\.sh --fake"):
        ensure_joined(_model(), tmp_path / "cache")


def test_qwen_builtins_name_the_setup_option_when_absent(monkeypatch):
    from harness.models import QWEN_CODER, resolve_spec

    # The test session's cache is empty (conftest), and no part is found:
    monkeypatch.setattr(gguf_parts.importlib.util, "find_spec", lambda name: None)
    for name in QWEN_CODER:
        with pytest.raises(FileNotFoundError, match=r"is not set up.*bash scripts/setup\.sh --qwen"):
            resolve_spec("builtin:" + name)
