"""The smoke run's report, opened in real headless Chromium as a person would."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from harness.report import render_report
from tests.test_profile import ROOT, smoke_run  # noqa: F401  (shared module fixture)

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    """Path of Debian's chromium, installed here when missing and possible."""
    path = shutil.which("chromium")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env,
                       check=False, capture_output=True, timeout=900)
        path = shutil.which("chromium")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing and could not be installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def _open(browser, path):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(path.resolve().as_uri(), wait_until="load")
    return page, errors


def test_smoke_report_renders_in_chromium(browser, smoke_run, tmp_path):  # noqa: F811
    report = render_report([smoke_run[0]], tmp_path / "smoke-report.html")
    page, errors = _open(browser, report)
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 5 and all(w > 0 for w in widths), widths
    assert page.locator("h2", has_text="Summary").count() == 1
    assert page.locator("table").nth(1).locator("tr").count() == 4  # header + three decoders
    shots = ROOT / "reports" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "smoke-report.png"), full_page=True)
    assert (shots / "smoke-report.png").stat().st_size > 10_000
    assert errors == []
    page.close()


def test_report_of_empty_run_shows_what_is_missing(browser, tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "run.json").write_text('{"status": "running", "profile": {}}')
    page, errors = _open(browser, render_report([run], tmp_path / "empty.html"))
    assert "holds no generations" in page.inner_text(".notes")
    assert errors == []
    page.close()
