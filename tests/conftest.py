from __future__ import annotations

import os

import pytest

from guardedtuning.recipes._split_family import BASELINE

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A small, fast configuration shared by the tests (tiny randomly initialised BERT).
TINY = {
    # the plain split recipe: the guarded defaults off, and the full cut every non-default design keeps
    # (recipes/_split_family.py BASELINE: tiny-bert has 4 blocks; the guarded default cuts after 4 of
    # MiniLM's 6 with a clipped 4-dim release)
    "recipe": "split",
    **BASELINE,
    "model.name": "tiny-bert",
    "model.max-length": 32,
    "data.train-size": 240,
    "data.test-size": 60,
    "federation.num-clients": 3,
    "federation.clients-per-round": 3,
    "federation.rounds": 2,
    "train.local-steps": 6,
    "train.batch-size": 8,
    "train.lr": 5e-3,
    "train.server-lr": 5e-3,
}


@pytest.fixture
def tiny_flat(tmp_path):
    return {**TINY, "output.dir": str(tmp_path / "run")}
