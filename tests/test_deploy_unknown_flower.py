"""On a Flower version the compatibility gate does not know, the stock SuperNode runs and the run finishes.

Issue 17, item 5: the warm SuperNode (guardedtuning/clients/warm_node.py) uses Flower
internals, all reached through guardedtuning/compat.py, whose gate accepts only the
versions they were written against (``compat.SUPPORTED_FLWR``). On any other version the
launcher's SuperNode command (``python -m guardedtuning.clients.warm_node supernode``, what
:class:`~guardedtuning.deploy.LocalFederation` and ``guardedtuning deploy`` start) must
replace itself with Flower's stock ``flower-supernode`` and the run must still finish.

The unknown version is simulated where the gate reads it (``compat.flower_version()``,
monkeypatched in this process), not in Flower. That a run then finishes on Flower's stock
SuperNode is the e2e test of the same exec path with the gate forced off
(tests/test_deployment.py::test_warm_supernode_command_runs_stock_flower_with_the_gate_off):
an unknown version and ``GUARDEDTUNING_FLOWER_COMPAT=off`` close the same gate, so a second
e2e run here (it was one, 1 client, 1 round) only repeated it.
"""

from __future__ import annotations

import os

import pytest

from guardedtuning import compat
from guardedtuning.clients import warm_node
from guardedtuning.deploy import LocalFederation
from guardedtuning.server_app.dispatch import install as install_dispatch
from guardedtuning.server_app.object_pulls import install as install_object_pulls

UNKNOWN = "1.99.0"


def test_an_unknown_flower_version_makes_the_warm_supernode_exec_the_stock_one(monkeypatch):
    monkeypatch.delenv(compat.ENV_VAR, raising=False)
    monkeypatch.setattr(compat, "flower_version", lambda: UNKNOWN)
    assert warm_node.stock_reason() == f"not patched for flwr {UNKNOWN}"
    execs: list[list[str]] = []
    monkeypatch.setattr(warm_node, "_exec", execs.append)
    monkeypatch.setattr(warm_node, "_Runner", lambda *a, **k: pytest.fail("the warm runner was started"))
    argv = ["--superlink", "127.0.0.1:9092", "--insecure", "--poll-min", "0.01", "--port", "9111"]
    assert warm_node.supernode_main(argv) == 0
    assert LocalFederation("unused", 1, tls=False, auth=False).supernode_kind() == f"stock (not patched for flwr {UNKNOWN})"
    assert len(execs) == 1 and os.path.basename(execs[0][0]) == "flower-supernode"
    assert execs[0][1:] == ["--superlink", "127.0.0.1:9092", "--insecure", "--port", "9111"]
    # the ServerApp's patches close on the same gate (what its log and the record's cost.dispatch say)
    assert install_object_pulls(0.01) == f"flower (not patched for flwr {UNKNOWN})"
    assert install_dispatch(0.002) == f"flower (not patched for flwr {UNKNOWN})"
