"""Attacks on what a GuardedTuning client releases, run by a curious server (plain torch).

- :mod:`.eia_nn`, :mod:`.eia_learned`, :mod:`.eia_opt`: embedding inversion of the
  released cut activations (nearest neighbour, learned MLP / transformer, optimisation);
- :mod:`.aia`: attribute inference from pooled released representations;
- :mod:`.update_inversion`: token recovery from bottom-LoRA updates (span prior and
  discrete gradient matching), on one client's update or on a secure aggregate;
- :mod:`.metrics`: top-1/top-5 recovery, ROUGE-L/1/2, token-set F1, majority rate.
"""
