"""``privtune`` (PrivTune, Liu et al.): split learning where each client perturbs every released
token vector with d_chi noise whose mean is optimised toward the token's n-hop neighbours in
embedding space and whose scale follows the token's importance (:mod:`guardedtuning.privacy.privtune`).
No DP-SGD, plain FedAvg of the bottom-LoRA updates."""

from guardedtuning.recipes._split_family import BASELINE, split_recipe

RECIPE = split_recipe("privtune", "split learning with PrivTune token noise", {
    **BASELINE, "privacy.mechanism": "privtune", "privacy.eta": 100.0, "privacy.rho": 1.0,
    "privacy.importance-strength": 0.5,
})
