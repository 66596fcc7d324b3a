"""Perplexity protocol (SPEC 1.6) on a random tiny LLaMA and a tiny text file."""

from __future__ import annotations

import math

import pytest
import torch

from compresskit_plugins.adapters.llama import perplexity
from compresskit.errors import CompressKitError
from compresskit_plugins.adapters.llama.sources import random_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "cache"))


def test_window_counts_drop_the_remainder():
    ids = torch.arange(103)
    w = perplexity.make_windows(ids, 10)
    assert perplexity.window_count(103, 10) == 10 and w.shape == (10, 10)
    assert torch.equal(w[3], torch.arange(30, 40)) and int(w[-1, -1]) == 99
    assert perplexity.make_windows(ids, 10, limit=4).shape == (4, 10)
    assert torch.equal(perplexity.make_windows(ids, 10, limit=4), w[:4])
    assert perplexity.make_windows(ids, 10, limit=50).shape == (10, 10)
    assert perplexity.make_windows(ids, 200).shape == (0, 200)
    with pytest.raises(CompressKitError, match="seqlen"):
        perplexity.window_count(10, 1)


def test_window_loss_is_mean_next_token_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    ids = torch.tensor([0, 1, 2])
    # row 0 predicts id 1 (logit 0 of e^2+2), row 1 predicts id 2 (logit 0 of e+2); row 2 predicts nothing
    expected = (math.log(math.e ** 2 + 2) + math.log(math.e + 2)) / 2
    assert perplexity.window_loss(logits, ids).item() == pytest.approx(expected, rel=1e-6)
    assert perplexity.perplexity_from_losses([1.0, 3.0]) == pytest.approx(math.exp(2.0))


def test_perplexity_equals_hand_computation(tmp_path):
    model, tok = random_model("tiny")
    docs = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!", "Sphinx of black quartz"]
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(docs))
    seqlen = 16
    out = perplexity.evaluate(model, tok, str(path), seqlen, limit=None, progress=False)

    ids = tok("\n\n".join(docs))["input_ids"]
    k = len(ids) // seqlen
    losses = []
    with torch.no_grad():
        for j in range(k):
            w = torch.tensor(ids[j * seqlen:(j + 1) * seqlen])
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            losses.append(-sum(logp[t, w[t + 1]] for t in range(seqlen - 1)).item() / (seqlen - 1))
            # the HF causal-LM loss over the same window agrees
            assert model(w[None], labels=w[None]).loss.item() == pytest.approx(losses[-1], rel=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(sum(losses) / k), rel=1e-5)
    p = out["protocol"]
    assert p["windows_used"] == p["windows_available"] == k and p["tokens_total"] == len(ids)
    assert p["tokens_evaluated"] == k * seqlen and p["metric"] == "token perplexity"
    assert p["data"]["sha256"] and p["data"]["documents"] == 3

    limited = perplexity.evaluate(model, tok, str(path), seqlen, limit=2, progress=False)
    assert limited["protocol"]["windows_used"] == 2 and limited["protocol"]["windows_available"] == k
    assert limited["perplexity"] == pytest.approx(math.exp(sum(losses[:2]) / 2), rel=1e-5)


def test_text_shorter_than_a_window_raises(tmp_path):
    model, tok = random_model("tiny")
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(CompressKitError, match=r"use --seqlen \d+ or less"):
        perplexity.evaluate(model, tok, str(path), 64, None, progress=False)


@pytest.mark.slow
def test_smollm2_wiki_perplexity_is_sane(monkeypatch):
    monkeypatch.delenv("COMPRESSKIT_CACHE")  # reuse the developer's real cache
    from compresskit_plugins.adapters.llama.sources import load_smollm2

    model, tok, _ = load_smollm2()
    out = perplexity.evaluate(model, tok, "wiki", 256, limit=8, progress=False)
    assert math.isfinite(out["perplexity"]) and 5 < out["perplexity"] < 60
    assert out["protocol"]["windows_available"] > 500
