"""Flower's deployment engine: a SuperLink and SuperNodes as real processes on localhost.

The federation runs `flwr run . <connection>` from the repository, with each SuperNode's
partition in its node config, then every process is stopped by PID. One variant is
insecure and runs the split recipe through `guardedtuning deploy local`; the other has TLS
and SuperNode authentication (an unregistered SuperNode is turned away) and runs the
guarded recipe (low-dim d_chi release, DP-SGD, secure aggregation) through :class:`LocalFederation`.
Both check that a split step costs far less than on Flower's own SuperNode, which waits
3 s after every empty poll and starts a process per message (13 to 41 s a step here).
A third forces the compatibility gate off (``GUARDEDTUNING_FLOWER_COMPAT=off``): the warm
SuperNode's command then becomes Flower's stock ``flower-supernode``, which still runs a round.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key

from guardedtuning import compat
from guardedtuning.clients.warm_node import Backoff
from guardedtuning.deploy import MARKER, LocalFederation, make_certificates, make_supernode_keys
from guardedtuning.launcher import free_port, processes_with_env, toml_value
from guardedtuning.recipes._split_family import BASELINE
from tests.test_drivers import check_contract

REPO = Path(__file__).resolve().parents[1]
TINY_SPLIT = {"recipe": "split", **BASELINE,  # the guarded knobs off, the full cut (tiny-bert: 4 blocks)
              "model.name": "tiny-bert", "model.max-length": 32, "data.train-size": 240, "data.test-size": 60,
              "federation.rounds": 2, "train.local-steps": 8, "train.batch-size": 8, "train.lr": 5e-3,
              "train.server-lr": 5e-3}
# Step times (Flower's stock SuperNode 13 to 41 s a step here, ours 0.6 s idle) are a benchmark's
# figures (simulations/deploy_step_time.py), not a test's: they depend on the machine's load.


def _check_run(record: dict, nodes: int) -> None:
    check_contract(record)
    assert record["num_clients"] == nodes and len(record["history"]) == 2
    losses = [r["train_loss"] for r in record["history"]]
    if record["recipe"] == "guarded":
        # the default's noise (a clipped 4-dim release at eta 2, DP-SGD) needs more than 2 rounds to move a
        # random tiny model's loss: learning is checked on split here, the default's utility in docs/
        assert all(math.isfinite(v) for v in losses), losses
    else:
        assert losses[1] < losses[0], losses
    cost = record["cost"]
    assert cost["bytes_up_per_client_round"] > 0 and cost["rejected_replies"] == 0
    assert cost["step_wall_s_median"] > 0, cost


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path):
    certs = make_certificates(tmp_path, ("10.1.2.3", "superlink.example.org", "127.0.0.1"))
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(certs.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert oct(certs.server_key.stat().st_mode & 0o777) == "0o600"


def test_supernode_keys_are_matching_p384_openssh_pairs(tmp_path):
    pairs = make_supernode_keys(tmp_path, 2)
    assert len(pairs) == 2 and pairs[0][1].read_bytes() != pairs[1][1].read_bytes()
    for private, public in pairs:
        key = load_ssh_private_key(private.read_bytes(), password=None)
        pub = load_ssh_public_key(public.read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key().public_numbers() == pub.public_numbers()


def test_backoff_grows_to_its_limit_and_resets():
    b = Backoff(start=0.01, limit=0.05, growth=2.0)
    assert [round(b.next(), 6) for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    b.reset()
    assert b.next() == 0.01
    with pytest.raises(ValueError, match="poll start"):
        Backoff(start=0.0, limit=1.0)


@pytest.mark.e2e
def test_insecure_deployment_through_the_cli(tmp_path):
    """`guardedtuning deploy local --insecure`: SuperLink, 2 SuperNodes, `flwr run`, all stopped."""
    root = tmp_path / "deploy"
    args = [sys.executable, "-m", "guardedtuning.cli", "deploy", "local", "--insecure", "--nodes", "2",
            "--dir", str(root), "--recipe", "split"]
    for k, v in TINY_SPLIT.items():
        if k != "recipe":
            args += ["--set", f"{k}={v}"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "insecure" in res.stdout and "step wall" in res.stdout
    record = json.loads((root / "run" / "results.json").read_text())
    _check_run(record, 2)
    assert processes_with_env(MARKER, str(root.resolve())) == []


@pytest.mark.e2e
def test_tls_and_supernode_auth_deployment(tmp_path):
    """TLS on every API, only registered SuperNodes admitted, `flwr run . <connection>`, guarded recipe."""
    root = tmp_path / "fed"
    out = tmp_path / "run"
    # the guarded recipe: a 4-dim release with d_chi noise (seeded, reproducible), DP-SGD, secure
    # aggregation's extra stages; cut after 2 of tiny-bert's 4 blocks
    base = {k: v for k, v in TINY_SPLIT.items()
            if k not in ("recipe", "privacy.mechanism", "dp.enabled", "aggregation.secure", "split.release-dim",
                         "privacy.clip", "aggregation.density")}
    flat = {**base, "recipe": "guarded", "privacy.noise-seed": 7, "federation.num-clients": 3,
            "federation.clients-per-round": 3, "output.dir": str(out)}
    run_config = " ".join(f"{k}={toml_value(v)}" for k, v in flat.items())
    fed = LocalFederation(root, 3)  # TLS and authentication are the defaults
    pids: list[int] = []
    try:
        fed.start()
        pids = [p.pid for p in fed.procs]
        config = (fed.cli_home / "config.toml").read_text()
        assert "root-certificates" in config and "insecure = true" not in config
        # a SuperNode whose key was not registered is turned away
        (stranger, _), = make_supernode_keys(root / "stranger", 1)
        env = fed.env(root / "stranger-home")  # carries the marker: stop() ends what it leaves behind
        log = root / "logs" / "stranger.log"
        with log.open("wb") as fh:  # a file, not a pipe: Flower's SuperExec outlives its SuperNode
            refused = subprocess.Popen(
                [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", fed.address,
                 "--root-certificates", str(fed.certs.ca), "--auth-supernode-private-key", str(stranger),
                 "--node-config", "partition-id=0 num-partitions=3", "--port", str(free_port()), "--max-retries", "1"],
                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        assert refused.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in log.read_text()
        assert fed.run(REPO, run_config, timeout=900) == 0, (root / "logs" / "flwr-run.log").read_text()[-3000:]
        listed = json.loads(fed.flwr("supernode", "ls", fed.name, "--format", "json").stdout)
        assert len(listed["nodes"]) == 3
    finally:
        fed.stop()
    record = json.loads((out / "results.json").read_text())
    _check_run(record, 3)
    assert record["recipe"] == "guarded" and record["privacy"]["epsilon"] is not None
    assert record["privacy"]["mechanism"]["name"] == "dchi"
    assert processes_with_env(MARKER, str(fed.root)) == []
    assert all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
               for pid in pids)


@pytest.mark.e2e
def test_warm_supernode_command_runs_stock_flower_with_the_gate_off(tmp_path, monkeypatch):
    """The gate forced off: `python -m guardedtuning.clients.warm_node supernode` execs Flower's own SuperNode."""
    monkeypatch.setenv(compat.ENV_VAR, "off")  # every process the federation starts inherits it
    root, out = tmp_path / "fed", tmp_path / "run"
    flat = {**TINY_SPLIT, "recipe": "fedlora", "federation.num-clients": 1, "federation.clients-per-round": 1,
            "federation.rounds": 1, "train.local-steps": 2, "output.dir": str(out)}
    run_config = " ".join(f"{k}={toml_value(v)}" for k, v in flat.items())
    fed = LocalFederation(root, 1, tls=False, auth=False)  # warm=True: the command the gate turns stock
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
    log = (root / "logs" / "supernode-0.log").read_text()
    assert f"flower ({compat.ENV_VAR}=off): running Flower's stock flower-supernode" in log
    record = json.loads((out / "results.json").read_text())
    assert record["recipe"] == "fedlora" and len(record["history"]) == 1
    assert record["cost"].get("dispatch", f"flower ({compat.ENV_VAR}=off)") == f"flower ({compat.ENV_VAR}=off)"
    assert processes_with_env(MARKER, str(fed.root)) == []
