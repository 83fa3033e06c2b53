r"""Token mechanisms: what a client does to its cut activations before releasing them.

One interface, :class:`TokenMechanism`, with thin subclasses:

- :class:`NoMechanism` (``none``): releases ``h`` as is (the unprotected baseline);
- :class:`DChiMechanism` (``dchi``): clip, then d_chi noise (:mod:`.dchi`);
- :class:`PrivTuneMechanism` (``privtune``): clip, add the token's optimized mean shift
  (norm <= rho), then d_chi noise with the token's own eta (:mod:`.privtune` builds both);
- :class:`GaussianMechanism` and :class:`LaplaceMechanism`: (epsilon, delta)- and
  epsilon-DP baselines per token vector, calibrated to the L2 clip.

Every mechanism treats each released position (one row of ``h`` (B, T, D)) as the unit
of privacy: the guarantees below are *local, per released position and per release*.
At a cut after k >= 1 blocks each position's vector depends on the whole sequence, so
the neighbouring inputs are any two sequences, and the bound is on the distance of the
two vectors released at that position (``2 * clip`` at most): it is not a bound on one
token's identity alone. A sequence of T positions composes (T times the epsilon), and an
example released R times in a run composes by basic composition: R times the
per-release figure at each position (``describe(releases=R)`` states the composed
epsilon; the run's record says how often an example is released). Where no clip bounds
the distance, or eta differs across tokens (PrivTune importance), the record's
``calibration`` says ``no bound`` and why instead of a calibration line. Padding positions
are released as zeros: at a cut after k >= 1 blocks they attend to the real tokens and
would otherwise carry them out unprotected (the top masks them as keys and the loss
ignores them).

Call it in the client's split step, before release::

    h_noisy = mechanism.perturb(h, attention_mask, generator=gen, input_ids=ids)

and put ``mechanism.describe()`` into ``results.json`` (``privacy``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

from guardedtuning.config.fields import fail as _fail
from guardedtuning.config.privacy import (
    MECHANISMS,
    PrivacyConfig,
    check_clip,
    check_delta,
    check_epsilon,
    check_eta,
    check_rho,
)
from guardedtuning.privacy.dchi import clip_tokens, sample_dchi_noise

DESCRIBE_KEYS = (
    "mechanism", "eta", "eta_min", "eta_max", "clip", "rho", "mean_shift_bound",
    "epsilon", "delta", "sigma", "laplace_scale", "calibration",
    "unit", "composition", "releases", "epsilon_run", "importance",
)

UNIT = ("per released position: each cut vector depends on the whole sequence, so neighbours are any two "
        "sequences and the distance is between the two vectors released at that position")
COMPOSITION = ("basic composition per release: an example released R times in a run gets R x the per-release "
               "epsilon at each position (R x eta x distance for d_chi); R is the number of releases of that "
               "example (see the record's scope), a sequence of T positions T x that")
IMPORTANCE = ("per-token eta from token importance computed on the client's own labelled rows "
              "(privacy.importance-source=client): eta_t can be read back from a release (the noise norm is "
              "D / eta_t on average), so a release shows which tokens the client's labels make "
              "class-discriminative; no bound covers this (set privacy.importance-source=public, or "
              "privacy.importance-strength=0)")
IMPORTANCE_PUBLIC = ("per-token eta from token importance computed on public labelled rows (rows of the corpus no "
                     "client holds and no evaluation reads, privacy.importance-source=public): the same eta table for every client, known to the "
                     "server, so reading eta_t back from a release shows nothing of the client's data beyond "
                     "the token itself (eta_t is a public function of the token id, one more clue to which token "
                     "it is); the tokens' eta still differ, so no bound holds across importance levels "
                     "(privacy.importance-strength=0 for one)")
IMPORTANCE_TEXTS = {"client": IMPORTANCE, "public": IMPORTANCE_PUBLIC}


def _describe(*, releases: int | None = None, **values: Any) -> dict[str, Any]:
    """The same keys for every mechanism; ``None`` where a figure does not apply.

    With ``releases`` (R >= 1) the per-release ``epsilon`` is also composed over R releases
    (``epsilon_run = R * epsilon``, basic composition); a mechanism with a noise (anything
    but ``none``) states its unit and how composition is counted.
    """
    unknown = set(values) - set(DESCRIBE_KEYS)
    if unknown:
        raise KeyError(f"unknown describe() keys {sorted(unknown)}")
    if releases is not None and (isinstance(releases, bool) or not isinstance(releases, int) or releases < 1):
        raise ValueError(f"releases must be an integer >= 1 (how often an example is released) but is {releases!r}")
    out = {k: values.get(k) for k in DESCRIBE_KEYS}
    if out["mechanism"] != "none":
        out["unit"], out["composition"] = UNIT, COMPOSITION
        if releases is not None:
            out["releases"] = releases
            out["epsilon_run"] = releases * out["epsilon"] if out["epsilon"] is not None else None
    return out


def no_bound(reason: str) -> str:
    """The ``calibration`` of a mechanism that states no epsilon: ``no bound: <reason>``."""
    return f"no bound: {reason}"


class TokenMechanism(ABC):
    """Perturbs every released token vector of a batch of cut activations."""

    name: str = ""

    def perturb(
        self,
        h: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        generator: torch.Generator,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The activations to release: (B, T, D) -> (B, T, D), padding positions zeroed.

        Parameters
        ----------
        h
            Cut activations (B, T, D), detached.
        attention_mask
            (B, T), 1 for real tokens.
        generator
            Randomness on ``h``'s device, private to the client (see :mod:`.randomness`).
        input_ids
            (B, T) token ids; needed by mechanisms whose noise depends on the token.
        """
        out = self._perturb(h, input_ids=input_ids, generator=generator)
        return out * attention_mask.unsqueeze(-1).to(out.dtype)

    @abstractmethod
    def _perturb(self, h: torch.Tensor, *, input_ids: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor: ...

    @abstractmethod
    def describe(self, *, releases: int | None = None) -> dict[str, Any]:
        """Figures for ``results.json``: keys :data:`DESCRIBE_KEYS`, ``None`` where n/a.

        ``releases``: how many times an example is released in the run; with it,
        ``epsilon_run`` is the per-release epsilon composed over them (basic composition).
        """


class NoMechanism(TokenMechanism):
    """Releases the activations unchanged (padding included): the unprotected baseline."""

    name = "none"

    def perturb(self, h: torch.Tensor, attention_mask: torch.Tensor, *, generator: torch.Generator,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        return h

    def _perturb(self, h: torch.Tensor, *, input_ids: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        return h

    def describe(self, *, releases: int | None = None) -> dict[str, Any]:
        return _describe(mechanism=self.name, calibration=no_bound("no mechanism: the activations are released as is"))


class DChiMechanism(TokenMechanism):
    """Clip each token vector to ``clip`` (if > 0), add noise with density ``exp(-eta ||z||)``.

    Guarantee per token vector: ``eta * ||x - x'||`` (metric DP); with a clip C also
    ``2 * eta * C``-DP, reported as ``epsilon``.
    """

    name = "dchi"

    def __init__(self, *, eta: float, clip: float = 0.0) -> None:
        check_eta(eta)
        check_clip(clip)
        self.eta = float(eta)
        self.clip = float(clip)

    def _perturb(self, h: torch.Tensor, *, input_ids: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        x = clip_tokens(h, clip=self.clip)
        return x + sample_dchi_noise(tuple(x.shape[:-1]), dim=x.shape[-1], eta=self.eta, generator=generator,
                                     device=x.device, dtype=x.dtype)

    def describe(self, *, releases: int | None = None) -> dict[str, Any]:
        if self.clip > 0:
            eps: float | None = 2 * self.eta * self.clip
            cal = (f"d_chi, per released position and release: eta * ||x - x'|| <= 2 * eta * clip = {eps:.6g} "
                   "(clipped vectors are at most 2 * clip apart)")
        else:
            eps, cal = None, no_bound("no clip bounds ||x - x'||: d_chi gives exp(eta * ||x - x'||) per release, "
                                      "which is unbounded over inputs (set privacy.clip > 0 for an epsilon)")
        return _describe(mechanism=self.name, eta=self.eta, eta_min=self.eta, eta_max=self.eta,
                         clip=self.clip or None, epsilon=eps, calibration=cal, releases=releases)


class PrivTuneMechanism(TokenMechanism):
    r"""PrivTune: clip, add the token's optimized mean shift, add d_chi noise at the token's eta.

    Released token vector at a position holding token ``t``:
    ``clip(h) + mean_shift[t] + z`` with ``z ~ exp(-token_eta[t] * ||z||)``. The mean shift
    is a per-vocabulary-token table built once (:func:`.privtune.build_privtune`); it is
    applied at the cut, directly to the released vector.

    Guarantee, per token vector, between two inputs whose vectors are ``x`` and ``x'``:

    - same token id (same eta, same shift): ``exp(eta_t * ||x - x'||)``, as d_chi;
    - different ids with equal eta: ``exp(eta * (||x - x'|| + 2 rho))``: each mean moved by
      at most rho, so the distance between the means grows by at most ``2 rho``
      (``mean_shift_bound``); with a clip C this is ``eta * (2C + 2 rho)``-DP;
    - different ids with *different* eta (importance scaling on): the two noise
      densities have different tails and their ratio is unbounded, so metric DP gives no
      bound across importance levels. ``epsilon`` is then reported as ``None``;
      ``eta_max`` is the weakest per-token level. Set ``privacy.importance-strength=0``
      for a uniform eta and a stated epsilon.

    ``importance_source`` (``public`` or ``client``, ``privacy.importance-source``) says
    which rows ``token_eta`` came from and sets the ``importance`` line of :meth:`describe`:
    client rows make eta_t a readable trace of the client's class-discriminative tokens,
    public rows do not. It defaults to ``client``: a table of unknown origin is stated as
    the client's.
    """

    name = "privtune"

    def __init__(self, *, eta: float, clip: float = 0.0, rho: float = 0.0,
                 token_eta: torch.Tensor | None = None, mean_shift: torch.Tensor | None = None,
                 importance_source: str = "client") -> None:
        check_eta(eta)
        if importance_source not in IMPORTANCE_TEXTS:
            raise ValueError(f"importance_source must be one of {sorted(IMPORTANCE_TEXTS)} but is "
                             f"{importance_source!r}; pass the privacy.importance-source the token_eta came from")
        check_clip(clip)
        check_rho(rho)
        if token_eta is not None and not bool((token_eta > 0).all()):
            raise ValueError("token_eta must be positive for every token; build it with token_eta()")
        if mean_shift is not None:
            worst = float(mean_shift.norm(dim=-1).max()) if mean_shift.numel() else 0.0
            if worst > rho * (1 + 1e-4) + 1e-6:
                raise ValueError(
                    f"mean_shift has a row of norm {worst:.4g} > rho = {rho}; the stated bound "
                    "would not hold: rebuild the table with the same rho"
                )
        elif rho > 0:
            raise ValueError("rho > 0 needs a mean_shift table; build it with privtune.build_privtune()")
        self.eta = float(eta)
        self.clip = float(clip)
        self.rho = float(rho)
        self.token_eta = token_eta
        self.mean_shift = mean_shift
        self.importance_source = importance_source

    def _perturb(self, h: torch.Tensor, *, input_ids: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        needs_ids = self.token_eta is not None or self.mean_shift is not None
        if needs_ids and (input_ids is None or tuple(input_ids.shape) != tuple(h.shape[:-1])):
            raise ValueError("privtune needs input_ids of shape (B, T) matching h (B, T, D)")
        x = clip_tokens(h, clip=self.clip)  # (B, T, D)
        if self.mean_shift is not None:
            assert input_ids is not None
            x = x + self.mean_shift.to(x.device, x.dtype)[input_ids]
        eta: float | torch.Tensor = self.eta
        if self.token_eta is not None:
            assert input_ids is not None
            eta = self.token_eta.to(x.device)[input_ids]  # (B, T)
        return x + sample_dchi_noise(tuple(x.shape[:-1]), dim=x.shape[-1], eta=eta, generator=generator,
                                     device=x.device, dtype=x.dtype)

    @property
    def uniform_eta(self) -> bool:
        return self.token_eta is None or bool((self.token_eta == self.token_eta[0]).all())

    def describe(self, *, releases: int | None = None) -> dict[str, Any]:
        lo = float(self.token_eta.min()) if self.token_eta is not None else self.eta
        hi = float(self.token_eta.max()) if self.token_eta is not None else self.eta
        uniform = self.uniform_eta
        eps = hi * (2 * self.clip + 2 * self.rho) if self.clip > 0 and uniform else None
        if not uniform:
            cal = no_bound(f"eta differs across tokens ({lo:.4g} to {hi:.4g}, importance scaling): two d_chi "
                           "densities of different eta have an unbounded ratio, so positions holding tokens of "
                           "different importance are not bounded (set privacy.importance-strength=0)")
        elif self.clip <= 0:
            cal = no_bound("no clip bounds ||x - x'||: d_chi gives exp(eta * (||x - x'|| + 2 rho)) per release, "
                           "which is unbounded over inputs (set privacy.clip > 0 for an epsilon)")
        else:
            cal = (f"d_chi with mean shift, per released position and release: eta * (||x - x'|| + 2 rho) <= "
                   f"eta * (2 * clip + 2 * rho) = {eps:.6g}")
        return _describe(mechanism=self.name, eta=self.eta, eta_min=lo, eta_max=hi, clip=self.clip or None,
                         rho=self.rho, mean_shift_bound=2 * self.rho, epsilon=eps, calibration=cal,
                         importance=None if uniform else IMPORTANCE_TEXTS[self.importance_source],
                         releases=releases)


def gaussian_delta(*, sigma: float, epsilon: float, sensitivity: float) -> float:
    r"""Exact delta of the Gaussian mechanism (Balle & Wang 2018, Theorem 8).

    :math:`\delta(\sigma) = \Phi(\frac{\Delta}{2\sigma} - \frac{\epsilon\sigma}{\Delta})
    - e^{\epsilon}\Phi(-\frac{\Delta}{2\sigma} - \frac{\epsilon\sigma}{\Delta})`.
    """
    from scipy.special import log_ndtr, ndtr

    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    return float(ndtr(a - b) - math.exp(epsilon + float(log_ndtr(-a - b))))


def analytic_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest sigma with (epsilon, delta)-DP for L2 sensitivity ``sensitivity``.

    The analytic Gaussian mechanism (Balle & Wang, ICML 2018, Algorithm 1 in effect): the
    exact privacy profile :func:`gaussian_delta` is decreasing in sigma, so we bisect it.
    Valid for every epsilon > 0 and delta in (0, 1), unlike the classical bound
    (:func:`classical_gaussian_sigma`), and never larger than it. Returns the upper end
    of the final bracket, so ``gaussian_delta(sigma) <= delta`` holds.
    """
    check_epsilon(epsilon)
    check_delta(delta)
    if not sensitivity > 0:
        raise ValueError(f"sensitivity must be positive but is {sensitivity}")
    hi = sensitivity
    while gaussian_delta(sigma=hi, epsilon=epsilon, sensitivity=sensitivity) > delta:
        hi *= 2
    lo = hi / 2
    while gaussian_delta(sigma=lo, epsilon=epsilon, sensitivity=sensitivity) <= delta and lo > 1e-12:
        hi, lo = lo, lo / 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if gaussian_delta(sigma=mid, epsilon=epsilon, sensitivity=sensitivity) <= delta:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def classical_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float) -> float:
    """``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` (Dwork & Roth, Thm A.1); only for epsilon < 1."""
    if not 0 < epsilon < 1:
        raise ValueError(f"the classical Gaussian bound needs 0 < epsilon < 1 but epsilon is {epsilon}; "
                         "use analytic_gaussian_sigma")
    check_delta(delta)
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


class GaussianMechanism(TokenMechanism):
    """Clip each token vector to C, add N(0, sigma^2 I): (epsilon, delta)-DP per token vector.

    Two clipped token vectors differ by at most ``2 C`` in L2 (replace-one neighbours in
    local DP), and sigma comes from the analytic Gaussian mechanism for that sensitivity.
    """

    name = "gaussian"

    def __init__(self, *, epsilon: float, delta: float, clip: float) -> None:
        check_epsilon(epsilon)
        check_delta(delta)
        check_clip(clip)
        if clip <= 0:
            raise _fail("privacy.clip", clip, "a positive bound for `privacy.mechanism=gaussian`")
        self.epsilon, self.delta, self.clip = float(epsilon), float(delta), float(clip)
        self.sigma = analytic_gaussian_sigma(epsilon=epsilon, delta=delta, sensitivity=2 * clip)

    def _perturb(self, h: torch.Tensor, *, input_ids: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        x = clip_tokens(h, clip=self.clip)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return x + (self.sigma * noise).to(x.dtype)

    def describe(self, *, releases: int | None = None) -> dict[str, Any]:
        return _describe(mechanism=self.name, clip=self.clip, epsilon=self.epsilon, delta=self.delta,
                         sigma=self.sigma, releases=releases,
                         calibration="analytic Gaussian (Balle & Wang 2018), L2 sensitivity 2*clip, per released "
                                     "position and release (R releases: R x epsilon and R x delta, basic composition)")


class LaplaceMechanism(TokenMechanism):
    """Clip each token vector to C, add Laplace(b) to every coordinate: epsilon-DP per token vector.

    The L1 sensitivity implied by the L2 clip is ``2 C sqrt(D)`` (Cauchy-Schwarz:
    ``||v||_1 <= sqrt(D) ||v||_2``), so ``b = 2 C sqrt(D) / epsilon``. This is loose by
    up to ``sqrt(D)`` for vectors that are not spread over all coordinates: it is a
    baseline, and shows why L2-shaped noise suits embeddings better.
    """

    name = "laplace"

    def __init__(self, *, epsilon: float, clip: float) -> None:
        check_epsilon(epsilon)
        check_clip(clip)
        if clip <= 0:
            raise _fail("privacy.clip", clip, "a positive bound for `privacy.mechanism=laplace`")
        self.epsilon, self.clip = float(epsilon), float(clip)
        self.dim: int | None = None

    def scale(self, dim: int) -> float:
        """Laplace scale ``b`` for token vectors of dimension ``dim``."""
        return 2 * self.clip * math.sqrt(dim) / self.epsilon

    def _perturb(self, h: torch.Tensor, *, input_ids: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        x = clip_tokens(h, clip=self.clip)
        self.dim = int(x.shape[-1])
        e = torch.empty((2, *x.shape), dtype=torch.float32, device=x.device).exponential_(1.0, generator=generator)
        return x + (self.scale(self.dim) * (e[0] - e[1])).to(x.dtype)  # Exp - Exp ~ Laplace(1)

    def describe(self, *, releases: int | None = None) -> dict[str, Any]:
        return _describe(mechanism=self.name, clip=self.clip, epsilon=self.epsilon,
                         laplace_scale=self.scale(self.dim) if self.dim else None, releases=releases,
                         calibration="Laplace per coordinate, L1 sensitivity 2*clip*sqrt(D), per released position "
                                     "and release")


def make_mechanism(
    name: str,
    *,
    eta: float = 100.0,
    clip: float = 0.0,
    rho: float = 0.0,
    epsilon: float = 8.0,
    delta: float = 1e-5,
    token_eta: torch.Tensor | None = None,
    mean_shift: torch.Tensor | None = None,
) -> TokenMechanism:
    """The mechanism called ``name`` (``privacy.mechanism``); bad values raise ConfigError.

    ``token_eta`` (V,) and ``mean_shift`` (V, D) are PrivTune's tables
    (:func:`guardedtuning.privacy.privtune.build_privtune`); other mechanisms ignore them.
    """
    if name == "none":
        return NoMechanism()
    if name == "dchi":
        return DChiMechanism(eta=eta, clip=clip)
    if name == "privtune":
        return PrivTuneMechanism(eta=eta, clip=clip, rho=rho, token_eta=token_eta, mean_shift=mean_shift)
    if name == "gaussian":
        return GaussianMechanism(epsilon=epsilon, delta=delta, clip=clip)
    if name == "laplace":
        return LaplaceMechanism(epsilon=epsilon, clip=clip)
    raise _fail("privacy.mechanism", name, "one of " + ", ".join(f"`{m}`" for m in MECHANISMS))


def mechanism_from_config(cfg: PrivacyConfig, *, token_eta: torch.Tensor | None = None,
                          mean_shift: torch.Tensor | None = None) -> TokenMechanism:
    """:func:`make_mechanism` with the values of a validated :class:`PrivacyConfig`.

    For ``privtune`` with ``privacy.rho > 0`` pass the tables, or use
    :func:`guardedtuning.privacy.privtune.privtune_from_config`, which builds them.
    """
    return make_mechanism(cfg.mechanism, eta=cfg.eta, clip=cfg.clip, rho=cfg.rho, epsilon=cfg.epsilon,
                          delta=cfg.delta, token_eta=token_eta, mean_shift=mean_shift)
