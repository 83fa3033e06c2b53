"""On a Flower version the compatibility gate does not know, the stock SuperNode runs and the run finishes.

Issue 17, item 5: the warm SuperNode (guardedtuning/clients/warm_node.py) uses Flower
internals, all reached through guardedtuning/compat.py, whose gate accepts only the
versions they were written against (``compat.SUPPORTED_FLWR``). On any other version the
launcher's SuperNode command (``python -m guardedtuning.clients.warm_node supernode``, what
:class:`~guardedtuning.deploy.LocalFederation` and ``guardedtuning deploy`` start) must
replace itself with Flower's stock ``flower-supernode`` and the run must still finish.

The unknown version is simulated where the gate reads it, not in Flower: every process of
the federation starts with a ``sitecustomize`` that makes ``compat.flower_version()``
report ``1.99.0`` (Flower itself still reports its real version, so its own
SuperLink/SuperNode version checks are untouched). The fast test does the same in this
process with monkeypatch.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from guardedtuning import compat
from guardedtuning.clients import warm_node
from guardedtuning.deploy import MARKER, LocalFederation
from guardedtuning.launcher import processes_with_env, toml_value
from tests.test_deployment import TINY_SPLIT

REPO = Path(__file__).resolve().parents[1]
UNKNOWN = "1.99.0"
STOCK_LINE = f"flower (not patched for flwr {UNKNOWN}): running Flower's stock flower-supernode"
SITECUSTOMIZE = '''\
import os
if os.environ.get("GT_TEST_FLOWER_VERSION"):  # tests/test_deploy_unknown_flower.py only
    import guardedtuning.compat as _compat
    _compat.flower_version = lambda: os.environ["GT_TEST_FLOWER_VERSION"]
'''


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


@pytest.mark.e2e
def test_a_run_finishes_on_the_stock_supernode_when_flower_is_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv(compat.ENV_VAR, raising=False)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("GT_TEST_FLOWER_VERSION", UNKNOWN)  # every process the federation starts inherits both
    root, out = tmp_path / "fed", tmp_path / "run"
    flat = {**TINY_SPLIT, "recipe": "fedlora", "federation.num-clients": 1, "federation.clients-per-round": 1,
            "federation.rounds": 1, "train.local-steps": 2, "output.dir": str(out)}
    run_config = " ".join(f"{k}={toml_value(v)}" for k, v in flat.items())
    fed = LocalFederation(root, 1, tls=False, auth=False)  # warm=True: the command the gate turns stock
    t0 = time.monotonic()
    try:
        fed.start()
        node = fed.procs[-1]
        assert "guardedtuning.clients.warm_node" in fed.supernode_command(0, None)
        cmdline = b""
        deadline = time.monotonic() + 120
        while b"flower-supernode" not in cmdline and time.monotonic() < deadline and node.poll() is None:
            time.sleep(0.2)
            cmdline = Path(f"/proc/{node.pid}/cmdline").read_bytes()
        assert b"flower-supernode" in cmdline and b"warm_node" not in cmdline, cmdline  # exec'd: same PID
        assert fed.run(REPO, run_config, timeout=600) == 0, (root / "logs" / "flwr-run.log").read_text()[-3000:]
    finally:
        fed.stop()
    print(f"stock SuperNode run: {time.monotonic() - t0:.1f} s")
    assert STOCK_LINE in (root / "logs" / "supernode-0.log").read_text()
    run_log = (root / "logs" / "flwr-run.log").read_text()
    assert f"object pulls: flower (not patched for flwr {UNKNOWN})" in run_log  # the ServerApp's patches too
    record = json.loads((out / "results.json").read_text())
    assert record["recipe"] == "fedlora" and [h["round"] for h in record["history"]] == [1]
    assert record["cost"]["dispatch"] == f"flower (not patched for flwr {UNKNOWN})"
    assert processes_with_env(MARKER, str(fed.root)) == []
