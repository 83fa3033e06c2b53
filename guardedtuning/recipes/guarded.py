"""``guarded`` (the default): split learning with PrivTune noise on every released token vector,
DP-SGD on the client's bottom LoRA, and the bottom-LoRA updates summed under secure aggregation
after sparsifying (rand-k) and quantizing them."""

from guardedtuning.recipes._split_family import split_recipe

RECIPE = split_recipe("guarded", "split learning + PrivTune noise + DP-SGD + secure sparse aggregation (default)", {
    "privacy.mechanism": "privtune", "privacy.eta": 100.0, "privacy.rho": 1.0,
    "dp.enabled": True, "dp.target-epsilon": 8.0, "dp.delta": 1e-5, "dp.max-grad-norm": 1.0,
    "aggregation.secure": True, "aggregation.density": 0.05, "aggregation.bits": 8,
})
