"""A decoder written outside this repository plugs in without editing it.

The example is the README's own ("Adding a decoder"), written into a temporary
package outside the tree; it runs through ``harness profile``, ``harness
report`` and the real ``lm_eval`` command, by module path and by entry point.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.test_profile import ROOT

BIN = Path(sys.executable).parent
PATH = "mypkg.decoders:RepeatDecoder"


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Adding a decoder") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """``mypkg`` in a folder of its own, with an installed-package record declaring the entry point."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "decoders.py").write_text(readme_example())
    info = root / "mypkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[decoding_harness.decoders]\nrepeat_last = {PATH}\n")
    return root


def run(plugin: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(ROOT)]), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(list(args), cwd=cwd or plugin, env=env, capture_output=True, text=True, timeout=600)


def test_example_is_exact_at_temperature_zero(plugin):
    code = f"""
import torch
from decoders import get_decoder
from harness.models import load_models
m = load_models("builtin:tiny-random", device="cpu")
ids = m.tokenizer("aaaa bbbb", return_tensors="pt").input_ids
greedy = dict(temperature=0.0, top_k=0, top_p=1.0)
ref = get_decoder("sampling", target=m.target, **greedy).generate(ids, 40)
out = get_decoder("{PATH}", target=m.target, gamma=3, **greedy).generate(ids, 40)
print(torch.equal(out.tokens, ref.tokens), sum(s.drafted for s in out.steps) > 0)
"""
    proc = run(plugin, sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True"]


@pytest.mark.slow
def test_example_runs_through_profile_and_report(plugin, tmp_path):
    profile = {
        "name": "plugin", "models": {"target": "builtin:tiny-random", "device": "cpu", "dtype": "float32"},
        "prompts": {"items": ["aaaa bbbb", "one two one two"]},
        "generation": {"max_new_tokens": 16, "repeats": 1, "warmup": 0},
        "decoders": [{"name": "sampling"}, {"name": PATH, "label": "repeat", "params": {"gamma": 2}},
                     {"name": "repeat_last", "label": "by-entry-point"}],
    }
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(profile))
    proc = run(plugin, sys.executable, "-m", "harness", "profile", str(path), "-o", str(tmp_path / "run"),
               "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    gens = pd.read_parquet(tmp_path / "run" / "generations.parquet")
    assert sorted(set(gens.decoder_label)) == ["by-entry-point", "repeat", "sampling"]
    repeat = gens[gens.decoder_label == "repeat"]
    assert json.loads(repeat.params_json.iloc[0])["gamma"] == 2
    assert all(len(d) == 2 for d in repeat.drafted_by_position)  # per-position stats sized by the method
    proc = run(plugin, sys.executable, "-m", "harness", "report", str(tmp_path / "run"), "-o",
               str(tmp_path / "report.html"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "repeat" in (tmp_path / "report.html").read_text()


def test_entry_point_makes_its_name_known(plugin):
    proc = run(plugin, sys.executable, "-m", "harness", "decoders", "repeat_last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "repeat_last" in proc.stdout and "copies of the last token to draft" in proc.stdout


@pytest.mark.slow
def test_example_runs_under_lm_eval(plugin, tmp_path):
    lm_eval = BIN / "lm_eval"
    if not lm_eval.exists():
        pytest.skip("lm_eval console script not installed in this environment")
    out = tmp_path / "out"
    proc = run(plugin, str(lm_eval), "--model", "decoding", "--model_args",
               f"decoder={PATH},pretrained=builtin:tiny-random,gamma=2", "--tasks", "harness_capitals",
               "--include_path", str(ROOT / "tasks"), "--limit", "2", "--output_path", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert "exact_match,strip" in results["results"]["harness_capitals"]
    gens = pd.read_parquet(next((out / "decoding-traces").iterdir()) / "generations.parquet")
    assert set(gens.decoder) == {PATH} and len(gens) == 2


def test_unknown_and_misspelled_names_are_refused(plugin):
    proc = run(plugin, sys.executable, "-m", "harness", "decoders", "mypkg.decoders:Nope", "repeat_lats")
    assert proc.returncode == 2
    assert "has no attribute 'Nope'" in proc.stderr
