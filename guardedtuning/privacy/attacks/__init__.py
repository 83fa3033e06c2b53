"""Attacks on what a GuardedTuning client releases, run by a curious server (plain torch).

- :mod:`.eia_nn`, :mod:`.eia_learned`, :mod:`.eia_opt`: embedding inversion of the
  released cut activations (nearest neighbour, learned MLP / transformer, optimisation);
- :mod:`.aia`: attribute inference from pooled released representations;
- :mod:`.update_inversion`: token recovery from bottom-LoRA updates (span prior and
  discrete gradient matching), on one client's update or on a secure aggregate;
- :mod:`.metrics`: top-1/top-5 recovery, ROUGE-L/1/2, token-set F1, majority rate.
"""

# What a design exposes to the attacks (a recipe's ``attack_surface``; :func:`.harness.attack_run` runs only the
# attacks on what the run's recipe declares)
RELEASED_ACTIVATIONS = "released-activations"  # cut activations (+ labels) the server sees per step
ADAPTER_UPDATES = "adapter-updates"  # a client's adapter update (plaintext or a secure sum)
