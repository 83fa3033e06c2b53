"""The attack harness on a Llama-style (decoder) bottom: every release attack runs, and succeeds undefended.

A tiny randomly initialised Llama (``tiny-llama``: 4 blocks, width 64, the MiniLM
tokenizer) is split as a ``split`` run splits it (:func:`~guardedtuning.models.parts.split_model`
from the run config: causal masks, rotary positions, the decoder's embedding table), and the
harness's own release path attacks client 0's released activations of the embedded
instruction task (``data.name=synthetic-instruct``): nearest neighbour, the adaptive
nearest neighbour, ridge, the learned MLP and transformer inversions, the relaxed-token
optimisation and attribute inference. Undefended (no token noise), the ridge, learned and
nearest-neighbour attacks must recover at least 90 % of the victim's tokens (ridge: 85 %, it
measures 0.892); under strong d_chi noise (eta = 0.05 on a width-64 cut) each must fall to at
most 15 % (the learned maps keep ~10 % by naming the template's frequent tokens), the
transformer inversion, which reads positions and neighbours of a templated text, to at most 40 %
(measured 0.311).
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from guardedtuning.privacy.attacks.harness import RELEASE_ATTACKS, AttackOptions, _release_attacks, _victim_rows
from guardedtuning.recipes import build_config
from tests.conftest import TINY

TOKEN_ATTACKS = ("eia_nn", "eia_nn_adaptive", "eia_ridge", "eia_mlp", "eia_transformer", "eia_opt")
MUST_RECOVER = ("eia_nn", "eia_mlp", "eia_transformer")  # >= 90 % of tokens undefended (measured 0.93, 0.99, 0.99)
RIDGE_FLOOR = 0.85  # ridge, measured 0.892: the victim tokens outside the 128 auxiliary rows' vocabulary it cannot name

# Cut to fit a fast test (the sweep's defaults are AttackOptions()); the learned inversions get
# enough epochs on the auxiliary text to learn a noise-free linear-ish map of a random model.
OPTS = AttackOptions(victim_rows=8, aux_rows=128, aia_rows=60, learned_epochs=10, noise_levels=(1.0,),
                     opt_steps=4, opt_candidates=4, adaptive_k=2, ridge_passes=1, attacks=RELEASE_ATTACKS)


def _cfg(tmp_path, **sets):
    flat = {**TINY, "recipe": "split", "model.name": "tiny-llama", "data.name": "synthetic-instruct",
            "model.max-length": 80, "data.train-size": 120, "data.test-size": 128,
            "output.dir": str(tmp_path / "run"), **sets}
    return build_config(flat)


def _attack(cfg, opts=OPTS):
    from guardedtuning.data.sources import load_task
    from guardedtuning.models.loading import load_tokenizer
    from guardedtuning.models.parts import split_model
    from guardedtuning.privacy.attacks.common import special_ids

    task = load_task(cfg.data, cfg.seed)
    model = split_model(cfg.model, cfg.split, cfg.lora, task.num_labels, "cpu", cfg.seed, lora_top=cfg.lora.top)
    bottom = model.bottom.eval()
    assert model.kind == "decoder" and type(bottom.embeddings).__name__ != "BertEmbeddings"
    tok = load_tokenizer(cfg.model.name)
    out: dict = {}
    _release_attacks(cfg, bottom, opts, out, lambda _m: None, tok=tok, special=special_ids(tok),
                     n=cfg.federation.num_clients)
    return out


@pytest.fixture(scope="module")
def undefended(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("llama"))
    return cfg, _attack(cfg)


def test_the_victim_is_an_instruction_decoder_client(undefended):
    cfg, _ = undefended
    rows = _victim_rows(cfg, 0, cfg.federation.num_clients)
    # decoder instruction examples: the loss only on response tokens (prompt labels -100)
    assert rows and all(ex.token_labels is not None and -100 in ex.token_labels for ex in rows[:4])
    assert any(t != -100 for t in rows[0].token_labels)


def test_the_attackers_auxiliary_text_has_the_victims_instruction_format(tmp_path):
    """The held-out rows the attacker trains on are tokenised as the clients tokenise theirs:
    the prompt template and the free-text response (not a classification prompt ending in a
    label word), so the response's vocabulary is in the attacker's table."""
    from guardedtuning.data.sources import load_task
    from guardedtuning.models.loading import load_tokenizer
    from guardedtuning.privacy.attacks.harness import _aux

    cfg = _cfg(tmp_path)
    tok, task = load_tokenizer(cfg.model.name), load_task(cfg.data, cfg.seed)
    aux = _aux(cfg, dataclasses.replace(OPTS, aux_rows=4))
    victim = _victim_rows(cfg, 0, cfg.federation.num_clients)[0]
    for ex, response in zip(aux, task.test["response"][:4], strict=True):
        answer = [t for t in ex.token_labels if t != -100]
        said = tok.decode(answer, skip_special_tokens=True)
        assert said.replace(" ", "") == response.lower().replace(" ", ""), (tok.decode(ex.ids), response)
    n = 6  # the template's first tokens are the victim's
    assert aux[0].ids[:n] == victim.ids[:n], (tok.decode(aux[0].ids[:n]), tok.decode(victim.ids[:n]))


def test_every_release_attack_runs_on_a_tiny_llama_bottom(undefended):
    _, out = undefended
    for name in TOKEN_ATTACKS:
        r = out[name]
        assert r is not None and r.get("error") is None, (name, r)
        assert r["metric"] == "token top-1" and 0.0 <= r["asr"] <= 1.0, (name, r)
        assert math.isnan(r["top5"]) or 0.0 <= r["top5"] <= 1.0, (name, r)  # nan: one candidate per position
        assert r["chance"] == pytest.approx(1 / 30522), (name, r)  # the decoder's (MiniLM tokenizer) vocabulary
    aia = out["aia"]
    assert 0.0 <= aia["asr"] <= 1.0 and 0.0 < aia["majority_rate"] < 1.0, aia


def test_an_undefended_llama_bottom_gives_its_tokens_away(undefended):
    _, out = undefended
    got = {a: round(out[a]["asr"], 3) for a in TOKEN_ATTACKS}
    assert all(out[a]["asr"] >= 0.9 for a in MUST_RECOVER) and out["eia_ridge"]["asr"] >= RIDGE_FLOOR, got
    assert out["eia_opt"]["asr"] >= 0.9, got  # started from the NN candidates, it keeps them


def test_strong_noise_on_the_llama_cut_defeats_every_token_attack(tmp_path):
    cfg = _cfg(tmp_path, **{"privacy.mechanism": "dchi", "privacy.eta": 0.05})
    assert cfg.privacy.mechanism == "dchi" and dataclasses.asdict(cfg.privacy)["eta"] == 0.05
    out = _attack(cfg, dataclasses.replace(OPTS, attacks=TOKEN_ATTACKS))
    got = {a: round(out[a]["asr"], 3) for a in TOKEN_ATTACKS}
    # measured: NN, adaptive, optimisation 0.0; ridge 0.102, MLP 0.106 -- the per-vector maps fall back to the
    # auxiliary text's most frequent tokens (the template's), which is what a guess without the release scores.
    # The transformer reads positions and neighbours: 0.311, a prior over the templated text, not the release.
    per_vector = [a for a in TOKEN_ATTACKS if a != "eia_transformer"]
    assert all(out[a]["asr"] <= 0.15 for a in per_vector), str(got)
    assert out["eia_transformer"]["asr"] <= 0.4, str(got)
