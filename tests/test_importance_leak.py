"""PrivTune's per-token eta, read back from releases: what token importance gives away.

The attack (a server that reads a client's releases). PrivTune releases
``clip(h) + shift[t] + z`` with ``||z|| ~ Gamma(D, 1 / eta_t)`` at every position holding token
``t``. A row released twice (a run releases each row about twice) gives ``z1 - z2`` exactly,
and ``E||z1 - z2||^2 = 2 D (D + 1) / eta_t^2``, so the server estimates each released token's
eta_t from the spread of its positions' releases (:func:`eta_attack`) and ranks the tokens by
the estimate. (Against the public per-token table instead, ``D / ||release - table[t]||``
also works on the tiny model, whose noise dwarfs the context; on MiniLM the context does
not, and the spread is within 1.4 %: ``simulations/importance_leak.py``.) The attacker is
given the token at each position: at the ``privtune`` recipe's eta the nearest-neighbour
attack already recovers ~99 % of them (docs/privacy-evaluation.md), and the question here
is what eta adds on top.

The victim: a client whose labels are decided by 16 words that are discriminative only in
its own rows (8 fruit words for class 0, 8 animal words for class 1; 60 filler words
spread evenly over both classes). The public corpus (rows of the task no client holds and no
evaluation reads) says nothing about them.

- ``privacy.importance-source=client``: the estimate's top 16 are the client's private
  discriminative words (the leak is real).
- ``privacy.importance-source=public``: every client gets the same eta table, the one from
  the public rows; the estimate follows the public ranking, and its top 16 overlap the
  client's private words no more than the public ranking's top 16 plus chance.
"""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import mannwhitneyu

from guardedtuning.config import build_config
from guardedtuning.data.batches import collate, tokenize, tokenize_rows
from guardedtuning.data.sources import load_task
from guardedtuning.models.loading import load_tokenizer
from guardedtuning.models.parts import client_bottom
from guardedtuning.privacy.attacks.common import special_ids
from guardedtuning.privacy.attacks.harness import make_releaser
from guardedtuning.privacy.client import ClientPrivacy, token_mechanism
from guardedtuning.privacy.privtune import token_eta, token_importance
from tests.conftest import TINY

FRUIT = ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum")
ANIMALS = ("horse", "tiger", "zebra", "eagle", "whale", "camel", "sheep", "goat")
FILLER = (
    "we", "saw", "today", "near", "big", "house", "with", "some", "friends", "in", "town", "yesterday",
    "after", "lunch", "before", "dinner", "my", "sister", "and", "brother", "walked", "down", "street", "while",
    "it", "was", "raining", "outside", "our", "old", "car", "stopped", "at", "corner", "then", "they",
    "talked", "about", "work", "school", "news", "music", "film", "book", "table", "chair", "window", "door",
    "garden", "river", "bridge", "train", "station", "morning", "evening", "night", "week", "month", "year",
    "city",
)
K = len(FRUIT) + len(ANIMALS)  # how many top tokens the attack names


def _texts(private: tuple[tuple[str, ...], tuple[str, ...]], rows: int = 80, seed: int = 0):
    """``rows`` texts; class c's rows carry 2 words of ``private[c]``, each row pair shares its 5 fillers."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(rows // 2):
        fill = rng.sample(FILLER, 5)
        for c in (0, 1):
            words = [*fill, *rng.sample(private[c], 2)]
            rng.shuffle(words)
            texts.append(" ".join(words))
            labels.append(c)
    return texts, labels


def _cfg(source: str | None):
    flat = {**TINY, "recipe": "privtune", "privacy.mechanism": "privtune", "privacy.eta": 2.0,
            "privacy.rho": 0.0, "privacy.clip": 0.0, "privacy.importance-strength": 0.5}
    if source is not None:  # None: the code's default (before the knob existed: the client's rows)
        flat["privacy.importance-source"] = source
    return build_config(flat)


@pytest.fixture(scope="module")
def parts():
    cfg = _cfg(None)
    tok = load_tokenizer(cfg.model.name)
    bottom = client_bottom(cfg.model, cfg.split.layer, cfg.lora, "cpu", cfg.seed).eval()
    return bottom, tok


def _examples(cfg, tok, texts, labels):
    return tokenize(tok, "encoder", texts, labels, max_length=cfg.model.max_length, label_names=("a", "b"),
                    instruction="")


def _word_ids(tok, words):
    ids = [tok.convert_tokens_to_ids(w) for w in words]
    assert tok.unk_token_id not in ids, "every test word must be one token of the vocabulary"
    return set(ids)


def eta_attack(bottom, tok, mech, knobs, batch, *, releases: int = 3) -> dict[int, float]:
    """The server's estimate of eta_t (token id -> estimate) from ``releases`` releases of ``batch``.

    Two releases of the same row differ by ``z1 - z2`` exactly (the clean vector, the clip
    and the mean shift cancel), and ``E||z1 - z2||^2 = 2 D (D + 1) / eta_t^2`` for d_chi noise
    (``||z|| ~ Gamma(D, 1 / eta_t)`` in a uniform direction); no table is needed.
    """
    sp = special_ids(tok)
    keep = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, torch.tensor(sp))
    ids = batch.input_ids[keep]  # (M,) the token at each released position (given: see the docstring)
    vocab, where = ids.unique(return_inverse=True)
    release = make_releaser(bottom, ClientPrivacy(seed=7, mechanism=mech, knobs=knobs, pid=0))
    hs = [release(batch)[keep] for _ in range(releases)]  # each (M, D)
    sq = torch.zeros(len(vocab), dtype=torch.float64)
    seen = torch.zeros(len(vocab), dtype=torch.float64)
    for a, b in zip(hs, hs[1:], strict=False):
        sq.index_add_(0, where, ((a - b) ** 2).sum(-1).double())
        seen.index_add_(0, where, torch.ones(len(ids), dtype=torch.float64))
    d = hs[0].shape[-1]
    est = (2 * d * (d + 1) / (sq / seen)).sqrt()
    return {int(v): float(est[i]) for i, v in enumerate(vocab)}


def _top(scores: dict[int, float], k: int) -> set[int]:
    return set(sorted(scores, key=lambda t: -scores[t])[:k])


def _auc(scores: dict[int, float], positive: set[int]) -> float:
    """How well ``scores`` rank the ``positive`` tokens above the rest (0.5 = chance, ties count half)."""
    pos = [v for t, v in scores.items() if t in positive]
    neg = [v for t, v in scores.items() if t not in positive]
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def _public_eta(cfg, tok) -> torch.Tensor:
    """The eta table the public rows give (``task.public``: no client holds them, no evaluation reads them)."""
    task = load_task(cfg.data, cfg.seed)
    rows = collate(tokenize_rows(task.public, tok, "encoder", max_length=cfg.model.max_length,
                                 label_names=task.label_names, instruction=task.instruction), tok.pad_token_id)
    imp = token_importance(rows.input_ids, rows.attention_mask, rows.class_ids, vocab_size=tok.vocab_size,
                           num_classes=task.num_labels, ignore_ids=special_ids(tok))
    return token_eta(imp, eta=cfg.privacy.eta, strength=cfg.privacy.importance_strength)


def _victim(parts, source):
    """The victim's mechanism (built by the client's code), the attack's estimate and what to score it against."""
    bottom, tok = parts
    cfg = _cfg(source)
    texts, labels = _texts((FRUIT, ANIMALS))
    examples = _examples(cfg, tok, texts, labels)
    batch = collate(examples, tok.pad_token_id)
    mech = token_mechanism(cfg, examples)  # exactly what the client builds
    private = _word_ids(tok, FRUIT + ANIMALS)
    own = token_importance(batch.input_ids, batch.attention_mask, batch.class_ids, vocab_size=tok.vocab_size,
                           num_classes=2, ignore_ids=special_ids(tok))
    released = {int(t) for t in batch.input_ids[batch.attention_mask.bool()]} - set(special_ids(tok))
    assert _top({t: float(own.score[t]) for t in released}, K) == private  # its own importance ranks them first
    est = eta_attack(bottom, tok, mech, cfg.privacy, batch)
    public = _public_eta(cfg, tok)
    return {
        "cfg": cfg, "mech": mech, "est": est, "private": private, "released": released, "public": public,
        "hit": len(_top(est, K) & private),  # private words among the attack's top K
        "chance": K * len(private) / len(released),
        "auc": _auc(est, private),
        "auc_public": _auc({t: float(public[t]) for t in released}, private),  # what public text alone gives
        "error": sum(abs(est[t] / float(mech.token_eta[t]) - 1) for t in released) / len(released),
    }


def _summary(v) -> str:
    return (f"top-{K} hits {v['hit']} (chance {v['chance']:.1f}), AUC {v['auc']:.3f} "
            f"(public ranking {v['auc_public']:.3f}), eta error {v['error']:.3f}")


def test_client_importance_lets_the_server_read_the_private_discriminative_tokens(parts):
    """importance-source=client: three releases name the client's class-discriminative words."""
    v = _victim(parts, "client")
    assert v["error"] < 0.1, _summary(v)  # eta_t read back from the releases within 10 %
    assert v["hit"] >= 14 and v["chance"] < 4, _summary(v)  # its top 16 are the private words
    assert v["auc"] >= 0.95 and v["auc"] >= v["auc_public"] + 0.4, _summary(v)  # far beyond public text


def test_public_importance_releases_nothing_client_specific(parts):
    """importance-source=public (the default): one eta table for all clients, and the attack sees only it."""
    _, tok = parts
    v = _victim(parts, "public")
    cfg, mech = v["cfg"], v["mech"]
    assert _cfg(None).privacy.importance_source == "public"  # the default
    # another client, whose private words are the other way round and whose fillers differ
    texts, labels = _texts((ANIMALS, FRUIT), rows=40, seed=3)
    other = token_mechanism(cfg, _examples(cfg, tok, texts, labels))
    assert torch.equal(other.token_eta, mech.token_eta)  # nothing client-specific in the table ...
    torch.testing.assert_close(mech.token_eta, v["public"])  # ... it is the public rows' table
    assert float(mech.token_eta.max()) > float(mech.token_eta.min())  # still importance-scaled
    importance = mech.describe()["importance"]
    assert "public" in importance and "no bound" in importance
    assert mech.describe()["calibration"].startswith("no bound:")  # non-uniform eta: still no bound
    # the attack still reads eta_t back, but that is the public table, and it ranks the private
    # words no better than the public ranking (or chance, where that is below chance)
    assert v["error"] < 0.1, _summary(v)
    assert v["auc"] <= max(v["auc_public"], 0.5) + 0.1, _summary(v)
    assert v["hit"] <= v["chance"] + 2, _summary(v)


def test_the_cached_mechanisms_are_kept_apart_by_source_and_the_attacker_has_the_public_table(parts):
    """Tables are cached per process by the whole config: switching the source never returns the other's."""
    from guardedtuning.privacy.attacks.harness import AttackOptions, _aux, client_privacy
    from guardedtuning.privacy.client import client_mechanism

    n = 3
    pub, own = _cfg("public"), _cfg("client")
    m_pub, m_own = client_mechanism(pub, 0, n), client_mechanism(own, 0, n)
    assert not torch.equal(m_pub.token_eta, m_own.token_eta)
    assert client_mechanism(pub, 0, n) is m_pub and client_mechanism(own, 0, n) is m_own
    assert torch.equal(client_mechanism(pub, 1, n).token_eta, m_pub.token_eta)  # one table for all clients
    assert "client's own labelled rows" in m_own.describe()["importance"]
    assert "public labelled rows" in m_pub.describe()["importance"]
    # what a client's reply (and so the run's record) states about its mechanism
    assert "public labelled rows" in ClientPrivacy(seed=0, mechanism=m_pub, knobs=pub.privacy).report()["importance"]
    # the attack harness's own PrivTune tables (from its auxiliary rows): the victim's, exactly, when public
    aux = _aux(pub, AttackOptions(aux_rows=32))
    attacker = client_privacy(pub, 1, n, seed=999, privacy=pub.privacy, examples=aux).mechanism
    assert torch.equal(attacker.token_eta, m_pub.token_eta)


@pytest.mark.parametrize("bad", ["private", "", "Public"])
def test_a_bad_importance_source_names_the_key_the_value_and_the_choices(bad):
    from guardedtuning.config.privacy import PrivacyConfig
    from guardedtuning.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        PrivacyConfig(mechanism="privtune", importance_source=bad)
    msg = str(info.value)
    assert "privacy.importance-source" in msg and repr(bad) in msg and "`public`" in msg and "`client`" in msg
