"""Attacks against a tiny undefended bottom recover the text; strong noise defeats them; metrics by hand."""

from __future__ import annotations

import pytest
import torch

from guardedtuning.config import build_config
from guardedtuning.data.batches import collate, tokenize
from guardedtuning.data.synthetic import synthetic_rows
from guardedtuning.models.loading import load_tokenizer
from guardedtuning.models.parts import client_bottom
from guardedtuning.privacy.attacks.aia import attribute_report, pooled
from guardedtuning.privacy.attacks.common import aux_batches, aux_vocabulary, special_ids
from guardedtuning.privacy.attacks.eia_learned import LearnedInversion
from guardedtuning.privacy.attacks.eia_nn import NearestNeighbourEIA
from guardedtuning.privacy.attacks.eia_opt import OptimizationEIA
from guardedtuning.privacy.attacks.harness import make_releaser
from guardedtuning.privacy.attacks.metrics import (
    content_tokens,
    majority_rate,
    rouge_l_tokens,
    rouge_n,
    token_report,
    token_set_f1,
    topk_recovery,
)
from guardedtuning.privacy.attacks.update_inversion import GradientMatching, Part, SpanAttack, lora_gradient
from tests.conftest import TINY

# ----------------------------------------------------------------------------- metrics by hand

def test_metrics_on_hand_made_examples():
    ids = torch.tensor([[101, 7, 8, 9, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    special = (0, 101, 102)
    # candidates: position 1 right at rank 1, position 2 right at rank 2, position 3 wrong
    cands = torch.tensor([[[101, 1], [7, 1], [1, 8], [1, 2], [102, 1], [0, 1]]])
    assert topk_recovery(cands, ids, mask, special, k=1) == pytest.approx(1 / 3)
    assert topk_recovery(cands, ids, mask, special, k=2) == pytest.approx(2 / 3)
    # LCS of [7, 1, 1] and [7, 8, 9] is 1: P = R = 1/3
    assert token_report(cands, ids, mask, special)["rouge_l"] == pytest.approx(1 / 3)
    assert rouge_l_tokens([1, 2, 3, 4], [1, 3, 4]) == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1))
    assert rouge_n([1, 2, 3], [1, 2, 4], 2) == pytest.approx(0.5)  # bigrams {12, 23} vs {12, 24}
    assert token_set_f1([5, 5, 6], [5, 7]) == pytest.approx(0.5)  # sets {5, 6} vs {5, 7}
    assert token_set_f1([], [1]) == 0.0
    assert content_tokens([101, 5, 102, 0], [1, 1, 1, 0], special) == [5]
    assert majority_rate(["a", "b", "a", "a"]) == 0.75


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def setup():
    cfg = build_config({**TINY, "model.max-length": 24})
    bottom = client_bottom(cfg.model, cfg.split.layer, cfg.lora, "cpu", cfg.seed)
    tok = load_tokenizer(cfg.model.name)
    return cfg, bottom, tok


def _batch(tok, texts):
    return collate(tokenize(tok, "encoder", texts, [0] * len(texts), max_length=24, label_names=("a",),
                            instruction=""), tok.pad_token_id)


def _releaser(cfg, bottom, mechanism="none", eta=100.0):
    from guardedtuning.privacy.client import ClientPrivacy
    from guardedtuning.privacy.mechanisms import make_mechanism

    c = build_config({**TINY, "privacy.mechanism": mechanism, "privacy.eta": eta, "privacy.rho": 0.0})
    return make_releaser(bottom, ClientPrivacy(seed=7, mechanism=make_mechanism(mechanism, eta=eta), knobs=c.privacy,
                                               pid=0))


def _texts(n, seed):
    return [str(r["text"]) for r in synthetic_rows(n, seed=seed)]


# ----------------------------------------------------------------------------- embedding inversion

def test_nearest_neighbour_recovers_clean_and_fails_under_noise(setup):
    cfg, bottom, tok = setup
    b = _batch(tok, _texts(8, seed=5))
    attack = NearestNeighbourEIA.from_bottom(bottom, table="bottom", context=(tok.cls_token_id, tok.sep_token_id))
    clean = token_report(attack.candidates(_releaser(cfg, bottom)(b)), b.input_ids, b.attention_mask,
                         special_ids(tok))
    noisy = token_report(attack.candidates(_releaser(cfg, bottom, "dchi", eta=0.5)(b)), b.input_ids,
                         b.attention_mask, special_ids(tok))
    assert clean["asr"] >= 0.9 and clean["top5"] >= clean["asr"]
    assert noisy["asr"] < 0.1


@pytest.mark.e2e  # slow: trains two inversion models
def test_learned_inversion_mlp_and_transformer(setup):
    cfg, bottom, tok = setup
    aux = aux_batches(tokenize(tok, "encoder", _texts(160, seed=99), [0] * 160, max_length=24, label_names=("a",),
                               instruction=""), tok.pad_token_id, 16)
    vocab = aux_vocabulary(aux, special_ids(tok))
    victim = _batch(tok, _texts(8, seed=5))
    for arch, epochs in (("mlp", 6), ("transformer", 8)):
        inv = LearnedInversion(vocab, 64, special_ids(tok), arch=arch)
        inv.fit(aux, [_releaser(cfg, bottom)], epochs=epochs, lr=3e-3)
        clean = token_report(inv.candidates(_releaser(cfg, bottom)(victim), victim.attention_mask),
                             victim.input_ids, victim.attention_mask, special_ids(tok))
        assert clean["asr"] >= 0.9, (arch, clean)
    noisy = LearnedInversion(vocab, 64, special_ids(tok), arch="mlp")
    loud = _releaser(cfg, bottom, "dchi", eta=0.5)
    noisy.fit(aux, [loud], epochs=2)
    rep = token_report(noisy.candidates(loud(victim), victim.attention_mask), victim.input_ids,
                       victim.attention_mask, special_ids(tok))
    assert rep["asr"] < 0.5  # it can only learn the token frequencies


def test_optimization_attack_improves_on_its_candidates(setup):
    cfg, bottom, tok = setup
    b = _batch(tok, _texts(4, seed=5))
    h = _releaser(cfg, bottom)(b)
    nn = NearestNeighbourEIA.from_bottom(bottom, table="embedding")
    cands = nn.candidates(h, k=16)
    out = OptimizationEIA(bottom, steps=60).invert(h, b.attention_mask, cands)
    rep = token_report(out, b.input_ids, b.attention_mask, special_ids(tok))
    before = token_report(cands, b.input_ids, b.attention_mask, special_ids(tok))
    assert rep["asr"] >= 0.9 and rep["asr"] >= before["asr"]
    hn = _releaser(cfg, bottom, "dchi", eta=0.5)(b)
    noisy = OptimizationEIA(bottom, steps=20).invert(hn, b.attention_mask, nn.candidates(hn, k=16))
    assert token_report(noisy, b.input_ids, b.attention_mask, special_ids(tok))["asr"] < 0.1


# ----------------------------------------------------------------------------- attribute inference

def test_attribute_inference_well_above_chance_and_degrades(setup):
    cfg, bottom, tok = setup
    aux_rows, vic_rows = synthetic_rows(240, seed=99), synthetic_rows(80, seed=5)

    def feats(rows, rel):
        b = _batch(tok, [str(r["text"]) for r in rows])
        return pooled(rel(b), b.attention_mask)

    for mech, eta, check in (("none", 100.0, "clean"), ("dchi", 0.2, "noisy")):
        rel = _releaser(cfg, bottom, mech, eta)
        rep = attribute_report(feats(aux_rows, rel), [r["condition"] for r in aux_rows], feats(vic_rows, rel),
                               [r["condition"] for r in vic_rows])
        if check == "clean":
            assert rep["asr"] >= 0.6 and rep["asr"] > 2 * rep["majority_rate"], rep
        else:
            assert rep["logreg"] < 0.4, rep


# ----------------------------------------------------------------------------- update inversion

def _trained_like(bottom):
    """A global adapter after some training (LoRA B != 0), restored afterwards by the caller."""
    g = torch.Generator().manual_seed(3)
    saved = {n: p.detach().clone() for n, p in bottom.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in bottom.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return saved


def test_update_inversion_recovers_a_short_row_and_not_from_a_sparse_sum(setup):
    cfg, bottom, tok = setup
    saved = _trained_like(bottom)
    try:
        rows = [str(r["text"]) for r in synthetic_rows(4, seed=5)]
        vocab = aux_vocabulary(aux_batches(tokenize(tok, "encoder", _texts(300, seed=99), [0] * 300, max_length=24,
                                                    label_names=("a",), instruction=""), tok.pad_token_id, 32),
                               special_ids(tok))
        enc = tok(rows[:1], return_tensors="pt", truncation=True, max_length=12)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        grad_h = torch.randn((*ids.shape, 64), generator=torch.Generator().manual_seed(1))
        update = -0.01 * lora_gradient(bottom, ids, mask, grad_h)  # one SGD step
        cands = SpanAttack(bottom, vocab).candidates(update, [mask], k=4)
        fixed = {(0, 0, 0): tok.cls_token_id, (0, 0, ids.shape[1] - 1): tok.sep_token_id}
        out = GradientMatching(bottom, vocab, sweeps=1, top_k=4).invert(update, [Part(mask, grad_h)], fixed=fixed,
                                                                         proposals=cands)[0]
        sp = special_ids(tok)
        ref = content_tokens(ids[0].tolist(), None, sp)
        assert token_set_f1(content_tokens(out[0].tolist(), None, sp), ref) >= 0.9
        # the same row inside a sum with three other rows, seen on 5 % of the coordinates
        others = tok(rows[1:], return_tensors="pt", padding=True, truncation=True, max_length=12)
        g2 = torch.randn((*others["input_ids"].shape, 64), generator=torch.Generator().manual_seed(2))
        total = update - 0.01 * lora_gradient(bottom, others["input_ids"], others["attention_mask"], g2)
        support = torch.randperm(total.numel(), generator=torch.Generator().manual_seed(0))[: total.numel() // 20]
        hidden = SpanAttack(bottom, vocab).candidates(total[support], [mask], support=support, k=1)[0][..., 0]
        assert token_set_f1(content_tokens(hidden[0].tolist(), None, sp), ref) < 0.5
    finally:
        with torch.no_grad():
            for n, p in bottom.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
