"""Validated settings of the client-side privacy knobs: ``privacy.*`` and ``dp.*``.

Two frozen dataclasses in the style of :mod:`guardedtuning.config`, meant to become the
``privacy`` and ``dp`` sections of :class:`~guardedtuning.config.RunConfig`:

- :class:`PrivacyConfig`: what happens to the activations a client releases at the cut
  (token mechanism, PrivTune tables, decorrelation, uplink quantization);
- :class:`DPConfig`: DP-SGD on the client's trainable bottom parameters (target budget,
  clipping, accountant).

Each field's error names its run-config key (``privacy.eta``), the bad value and what is
allowed. :func:`check_combination` catches settings that are fine alone but void a
guarantee together.
"""

from __future__ import annotations

from dataclasses import dataclass

from guardedtuning.config.fields import fail as _fail
from guardedtuning.config.fields import opt as _opt
from guardedtuning.errors import ConfigError

MECHANISMS = ("none", "dchi", "privtune", "gaussian", "laplace")
ACCOUNTANTS = ("rdp", "prv")
NOPEEK_LEVELS = ("token", "example")
QUANTIZE_BITS = (0, 4, 8)
IMPORTANCE_SOURCES = ("public", "client")


def check_eta(eta: float, key: str = "privacy.eta") -> None:
    if not eta > 0:
        raise _fail(key, eta, "a positive number (the d_chi privacy parameter; smaller is noisier)")


def check_clip(clip: float, key: str = "privacy.clip") -> None:
    if not clip >= 0:
        raise _fail(key, clip, "a number >= 0 (0 switches per-token clipping off)")


def check_rho(rho: float, key: str = "privacy.rho") -> None:
    if not rho >= 0:
        raise _fail(key, rho, "a number >= 0 (the bound on PrivTune's mean shift; 0 switches it off)")


def check_epsilon(epsilon: float, key: str = "privacy.epsilon") -> None:
    if not epsilon > 0:
        raise _fail(key, epsilon, "a positive number (epsilon = 0 would need infinite noise)")


def check_delta(delta: float, key: str = "privacy.delta") -> None:
    if not 0 < delta < 1:
        raise _fail(key, delta, "a number in (0, 1), far below 1 / (number of examples), e.g. 1e-5")


@dataclass(frozen=True)
class PrivacyConfig:
    mechanism: str = _opt(
        "dchi",
        "noise on every released token vector: `none`, `dchi` (metric DP), `privtune` "
        "(d_chi with optimized mean and importance-scaled noise), `gaussian` or `laplace` (baselines)",
    )
    eta: float = _opt(2.0, "d_chi parameter: noise density exp(-eta*||z||); PrivTune's average eta")
    clip: float = _opt(1.0, "L2 bound each token vector is clipped to before the noise; 0 = no clipping")
    rho: float = _opt(1.0, "PrivTune: bound on the optimized mean shift, in units of the released activations")
    epsilon: float = _opt(8.0, "gaussian/laplace baselines: per-token epsilon")
    delta: float = _opt(1e-5, "gaussian baseline: per-token delta")
    importance_strength: float = _opt(
        0.5, "PrivTune: how strongly token importance moves each token's eta, in [0, 1)"
    )
    importance_source: str = _opt(
        "public",
        "PrivTune: rows token importance comes from: `public` (labelled rows no client holds and no evaluation reads, the same for "
        "every client and known to the server: eta_t shows nothing of the client's data) or `client` (the "
        "client's own rows: eta_t, readable from one release, shows which tokens its labels make discriminative)",
    )
    knn_k: int = _opt(10, "PrivTune: neighbours per token in the vocabulary k-NN graph")
    hops: int = _opt(2, "PrivTune: the mean moves toward the centroid of the n-hop indirect neighbours (2 or 3)")
    pgd_steps: int = _opt(20, "PrivTune: projected-gradient steps of the mean optimisation")
    utility_weight: float = _opt(0.5, "PrivTune: weight of the utility (direction-keeping) term")
    cache_dir: str = _opt("", "folder caching the k-NN graph and mean table; empty = ~/.cache/guardedtuning")
    nopeek_weight: float = _opt(0.0, "weight of the distance-correlation (NoPeek) term in the client loss")
    nopeek_level: str = _opt(
        "token", "`token` (within each example; DP-SGD compatible) or `example` (across the batch, as NoPeek)"
    )
    quantize_bits: int = _opt(0, "uplink activation quantization: 0 (off), 8 or 4 bits")
    noise_seed: int = _opt(
        -1,
        "-1 draws every noise and sampling draw from fresh OS entropy (needed for the guarantee); "
        ">= 0 makes them reproducible for tests and benchmarks, which voids the guarantee",
    )

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise _fail("privacy.mechanism", self.mechanism, "one of " + ", ".join(f"`{m}`" for m in MECHANISMS))
        check_eta(self.eta)
        check_clip(self.clip)
        check_rho(self.rho)
        check_epsilon(self.epsilon)
        check_delta(self.delta)
        if self.mechanism in ("gaussian", "laplace") and self.clip <= 0:
            raise _fail(
                "privacy.clip", self.clip,
                f"a positive bound for `privacy.mechanism={self.mechanism}` (its noise is calibrated to "
                "the clipped token's sensitivity; without a bound no noise level gives the stated epsilon)",
            )
        if not 0 <= self.importance_strength < 1:
            raise _fail("privacy.importance-strength", self.importance_strength, "a number in [0, 1)")
        if self.importance_source not in IMPORTANCE_SOURCES:
            raise _fail("privacy.importance-source", self.importance_source,
                        "`public` (importance from public rows no client holds, the default) or `client` (from the "
                        "client's own rows, which its releases then reveal)")
        if self.knn_k < 1:
            raise _fail("privacy.knn-k", self.knn_k, "a positive integer")
        if self.hops not in (2, 3):
            raise _fail("privacy.hops", self.hops, "2 or 3 (1-hop neighbours are what the mean moves away from)")
        if self.pgd_steps < 1:
            raise _fail("privacy.pgd-steps", self.pgd_steps, "a positive integer")
        if self.utility_weight < 0:
            raise _fail("privacy.utility-weight", self.utility_weight, "a number >= 0")
        if self.nopeek_weight < 0:
            raise _fail("privacy.nopeek-weight", self.nopeek_weight, "a number >= 0")
        if self.nopeek_level not in NOPEEK_LEVELS:
            raise _fail("privacy.nopeek-level", self.nopeek_level, "`token` or `example`")
        if self.quantize_bits not in QUANTIZE_BITS:
            raise _fail("privacy.quantize-bits", self.quantize_bits, "0 (off), 8 or 4")
        if self.noise_seed < -1:
            raise _fail("privacy.noise-seed", self.noise_seed, "-1 (private OS seed) or an integer >= 0")


@dataclass(frozen=True)
class DPConfig:
    enabled: bool = _opt(True, "DP-SGD on the client's trainable bottom parameters (Opacus)")
    target_epsilon: float = _opt(
        8.0, "each client's epsilon against the server over the planned rounds: where the server sees which "
             "rows a step used (split, privtune, guarded) the worst example at dp.max-participations, without "
             "amplification by sampling; elsewhere with it",
    )
    delta: float = _opt(1e-5, "DP-SGD delta; keep it below 1 / (examples per client)")
    max_grad_norm: float = _opt(1.0, "per-example gradient clipping bound C")
    accountant: str = _opt(
        "rdp", "`rdp` or `prv` (privacy accountant, per client; prv is tighter but costs ~0.3 s per step on CPU)"
    )
    max_participations: int = _opt(
        0, "where the server sees which rows a step used: the most DP-SGD steps one example may take part in "
           "(a row that reached it leaves later Poisson batches); 0 = auto, the cap that gives the most expected "
           "row uses per unit of noise for the planned steps",
    )
    secure_mode: bool = _opt(False, "Opacus's secure_mode: DP noise that resists floating-point attacks "
                                    "(4 Gaussian draws per value instead of 1)")

    def __post_init__(self) -> None:
        check_epsilon(self.target_epsilon, "dp.target-epsilon")
        check_delta(self.delta, "dp.delta")
        if not self.max_grad_norm > 0:
            raise _fail("dp.max-grad-norm", self.max_grad_norm, "a positive number")
        if self.accountant not in ACCOUNTANTS:
            raise _fail("dp.accountant", self.accountant, "`rdp` or `prv`")
        if self.max_participations < 0:
            raise _fail("dp.max-participations", self.max_participations,
                        "an integer >= 0 (0 = auto; n = at most n DP-SGD steps per example)")


def check_combination(privacy: PrivacyConfig, dp: DPConfig) -> None:
    """Reject settings that are valid alone but break DP-SGD's per-example guarantee together.

    ``privacy.nopeek-level=example`` couples the examples of a batch in one loss term, so
    an example's gradient depends on the others and per-example clipping no longer bounds
    any one example's influence.
    """
    if dp.enabled and privacy.nopeek_weight > 0 and privacy.nopeek_level == "example":
        raise ConfigError(
            "`privacy.nopeek-level` is 'example' while `dp.enabled` is true: a batch-level "
            "decorrelation term mixes examples, which voids DP-SGD's per-example clipping; "
            "set --set privacy.nopeek-level=token (or privacy.nopeek-weight=0)"
        )
