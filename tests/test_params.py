"""Parameters are declared once: every check, message and listing reads the declaration."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from decoders import available_decoders, decoder_class, decoder_param_info, decoder_params, get_decoder
from harness.profile_spec import ProfileError, parse_profile
from tests.test_profile import ROOT


@pytest.mark.parametrize("name", available_decoders())
def test_every_parameter_has_a_doc_a_kind_and_a_valid_default(name):
    infos = decoder_param_info(name)
    assert set(infos) == set(decoder_params(name))
    for key, info in infos.items():
        assert info.doc and info.kind in (int, float, bool)
        decoder_class(name).check_param(key, decoder_params(name)[key])  # defaults pass their own checks


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("key", ["temperature", "top_p"])
def test_non_finite_floats_are_refused(tiny, key, value):
    with pytest.raises(ValueError, match=f"{key} must be a finite number"):
        get_decoder("sampling", target=tiny.target, **{key: value})


@pytest.mark.parametrize("value", [1.5, 0.0, -0.1, math.nan])
def test_accept_thres_outside_0_1_is_refused(tiny, value):
    with pytest.raises(ValueError, match="accept_thres must be"):
        get_decoder("mtad", target=tiny.target, draft=tiny.draft, accept_thres=value)
    get_decoder("mtad", target=tiny.target, draft=tiny.draft, accept_thres=1.0)  # the bound itself is fine


def test_misspelled_parameter_suggests_the_known_one(tiny):
    with pytest.raises(TypeError, match="Did you mean 'gamma'"):
        get_decoder("specdecode", target=tiny.target, draft=tiny.draft, gama=2)


def test_profile_refuses_nan_temperature_before_loading():
    raw = {"models": {"target": "builtin:tiny-random"}, "prompts": {"items": ["hi"]},
           "decoders": [{"name": "sampling", "params": {"temperature": float("nan")}}]}
    with pytest.raises(ProfileError, match="decoders.0..params.temperature: temperature must be a finite number"):
        parse_profile(raw)


def test_cli_lists_the_declaration():
    proc = subprocess.run([sys.executable, "-m", "harness", "decoders", "mtad"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "accept_thres" in proc.stdout and "> 0 and <= 1" in proc.stdout and "0.5" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [("gama=1", "unknown model_args gama; did you mean 'gamma'"),
     ("bogus_arg=3", "unknown model_args bogus_arg"),
     ("gamma=0", "gamma must be >= 1")],
)
def test_lm_eval_model_args_are_checked(args, message):
    from harness.lm_eval_models import ModelArgsError, SpecDecodeLM

    pair = {"pretrained": "builtin:tiny-random", "draft": "builtin:tiny-random-draft", "device": "cpu"}
    key, value = args.split("=")
    with pytest.raises(ModelArgsError, match=message):
        SpecDecodeLM(**pair, **{key: int(value)})


def test_lm_eval_decoding_needs_a_known_decoder():
    from harness.lm_eval_models import DecodingLM, ModelArgsError

    with pytest.raises(ModelArgsError, match="needs decoder=NAME"):
        DecodingLM(pretrained="builtin:tiny-random", device="cpu")
    with pytest.raises(ModelArgsError, match="Did you mean 'prompt_lookup'"):
        DecodingLM(pretrained="builtin:tiny-random", decoder="prompt_lookp", device="cpu")


@pytest.mark.slow
def test_lm_eval_command_prints_one_line_for_bad_model_args(tmp_path):
    from tests.test_lm_eval import BIN, _env

    lm_eval = BIN / "lm_eval"
    if not lm_eval.exists():
        pytest.skip("lm_eval console script not installed in this environment")
    proc = subprocess.run(
        [str(lm_eval), "--model", "specdecode", "--model_args",
         "pretrained=builtin:tiny-random,draft=builtin:tiny-random-draft,gama=1", "--tasks", "harness_capitals",
         "--include_path", str(ROOT / "tasks"), "--limit", "1"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "lm_eval: error: --model specdecode: unknown model_args gama; did you mean 'gamma'" in proc.stderr
