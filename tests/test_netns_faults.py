"""Faults a guarded run survives on the namespaced federation (tests/netns.py).

Three SuperNodes, each in its own network namespace, TLS and SuperNode authentication on,
the guarded recipe (4-dim d_chi release, DP-SGD, secure aggregation; tiny-bert), 3 rounds
of 2 local steps, ``comm.timeout`` 120 s. Each test injects one fault in round 2, after its
first split step:

- a SuperNode SIGKILLed (with its ClientApp process) and restarted from 5 s later, every
  5 s until the SuperLink takes its key again (a service manager's restart-on-failure);
- a SuperNode SIGKILLed for good;
- the ServerApp SIGKILLed, then the run submitted again on the same output folder (with a DP
  plan that leaves room for the re-run round, ``dp.max-participations`` = the planned steps);
- 5 % "loss" on one link for the whole run (the relay's model: a segment waits one RTO);
- one link cut for 30 s (``ip link set down`` on the router's side of its veth pair).

Each checks that the run finishes, that ``events.jsonl`` says what happened (a ``dropped``
event with the reason, a ``resume`` event), that every round was either aggregated by
secure aggregation from at least its threshold of survivors or refused (``refused``) with
the aggregated model unchanged (compared on every round's checkpoint, copied as it
appears), and that the DP accounting never under-counts: the server's ledger charges each
step when it sends the message asking for it, so no node is charged less than it
acknowledged or its own accountant reports, a node that never failed is charged every
step, a restarted node (whose accountant died with it) no less than a node sampled in the
same rounds, and a resumed run keeps the interrupted attempt's charge.

Each test prints ``FAULT <name>: wall <s> s`` and every round's wall time (run with
``-s``); docs/deployment.md has the table. They take 4 to 8 minutes each on a busy two-core machine, more than CI's budget for this
tier, so they run only with ``GUARDEDTUNING_WAN_FAULTS=1``:

    GUARDEDTUNING_WAN_FAULTS=1 python -m pytest -s -m e2e tests/test_netns_faults.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.netns import NetnsFederation, Wan, netns_pids, unavailable
from tests.test_netns_federation import REPO, guarded_flat, run_config

REASON = unavailable()
ENV = "GUARDEDTUNING_WAN_FAULTS"
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}"),
    pytest.mark.skipif(os.environ.get(ENV) != "1",
                       reason=f"the fault tests take 4-8 min each (over CI's budget); set {ENV}=1 to run them"),
]
# 3 clients: secure aggregation's automatic plan is the complete graph (degree 2) and threshold 2 (> 3/2).
# A client's shares are held by its neighbours, so one lost client leaves each survivor 1 < 2 live share
# holders: the round is refused and the model stays as it was. (With 5 clients, threshold 3 of 4
# neighbours, a round survives one loss; on the busy 2-core machine 5 SuperNodes did not fit the time.)
NODES, ROUNDS, STEPS = 3, 3, 2
THRESHOLD = 2


class Scenario:
    """A federation of :data:`NODES` SuperNodes on a fresh :class:`Wan`, and one run's output folder."""

    def __init__(self, tmp: Path, **over) -> None:
        self.out = tmp / "run"
        self.flat = guarded_flat(self.out, NODES, **{"federation.rounds": ROUNDS, "train.local-steps": STEPS,
                                                     "comm.timeout": 120.0, **over})
        self.wan = Wan(NODES)
        self.fed = NetnsFederation(tmp / "fed", self.wan)
        self.t0 = 0.0
        self.snapshots = tmp / "checkpoints"  # every round's checkpoint, copied as it appears
        self._watching = threading.Event()

    def __enter__(self) -> Scenario:
        self.wan.__enter__()
        try:
            self.fed.start()
        except BaseException:
            self.close()
            raise
        self._watching.set()
        threading.Thread(target=self._snapshot, daemon=True).start()
        return self

    def _snapshot(self) -> None:
        self.snapshots.mkdir(parents=True, exist_ok=True)
        while self._watching.is_set():
            for f in self.out.glob("checkpoint-r*.safetensors"):
                target = self.snapshots / f.name
                if not target.exists():
                    time.sleep(0.2)  # let the writer finish (it writes the tensors, then checkpoint.json)
                    with contextlib.suppress(FileNotFoundError):
                        shutil.copyfile(f, target)
            time.sleep(0.1)

    def global_bottom(self, rnd: int) -> dict | None:
        """The aggregated bottom LoRA after round ``rnd`` (from its checkpoint), or None if none was seen."""
        from safetensors.torch import load_file

        path = self.snapshots / f"checkpoint-r{rnd:05d}.safetensors"
        if not path.exists():
            return None
        return {k: v for k, v in load_file(path).items() if k.startswith("state/global_bottom/")}

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._watching.clear()
        try:
            self.fed.stop()
        finally:
            self.wan.close()

    def submit(self, log_name: str = "flwr-run.log") -> subprocess.Popen[bytes]:
        self.t0 = self.t0 or time.monotonic()
        return self.fed.submit(REPO, run_config(self.flat), log_name=log_name)

    def events(self) -> list[dict]:
        path = self.out / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def wait_for_step(self, rnd: int, step: int, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e["event"] == "step" and e["round"] == rnd and e["step"] >= step for e in self.events()):
                return
            assert proc.poll() is None, self.log()
            time.sleep(0.2)
        raise TimeoutError(f"no step {step} of round {rnd} within {timeout:.0f}s; {self.log()}")

    def finish(self, proc: subprocess.Popen[bytes], timeout: float = 900) -> float:
        rc = proc.wait(timeout=timeout)
        assert rc == 0, self.log()
        return time.monotonic() - self.t0

    def log(self, name: str = "flwr-run.log") -> str:
        path = self.fed.root / "logs" / name
        return path.read_text()[-3000:] if path.exists() else f"(no {path})"


def check_record(s: Scenario, name: str, wall: float) -> tuple[dict, list[dict]]:
    """Every round recorded and aggregated by >= THRESHOLD survivors, or refused; the ledger never under-counts."""
    record = json.loads((s.out / "results.json").read_text())
    events = s.events()
    assert [h["round"] for h in record["history"]] == list(range(1, ROUNDS + 1))
    refused = {e["round"] for e in events if e["event"] == "refused"}
    for rnd in range(1, ROUNDS + 1):
        starts = [e for e in events if e["event"] == "round_start" and e["round"] == rnd]
        if not starts:  # the strategy sent nothing (e.g. too few clients for secure aggregation)
            assert rnd in refused, (rnd, events)
        else:
            dropped = dropped_in(events, rnd)
            assert rnd in refused or len(set(starts[-1]["clients"]) - dropped) >= THRESHOLD, (rnd, events)
        before, after = s.global_bottom(rnd - 1), s.global_bottom(rnd)
        if before is not None and after is not None:
            same = all(torch.equal(before[k], after[k]) for k in after)
            assert same == (rnd in refused), f"round {rnd}: refused {rnd in refused}, model unchanged {same}"
    per_node = record["privacy"]["dp"]["per_node"]
    ledger = json.loads((s.out / "privacy-ledger.json").read_text())["nodes"]
    ever_dropped = {e["node"] for e in events if e["event"] == "dropped" and e.get("node") is not None}
    # a node secure aggregation rejected at a key stage is named in the reason (it got no training message)
    ever_dropped |= {int(n) for n in per_node for e in events
                     if e["event"] == "dropped" and e.get("node") is None and n in e.get("reason", "")}
    for node, entry in per_node.items():
        # the server charges a step when it sends the message asking for it: never less than the node
        # acknowledged or its own accountant reports; a node that never failed is charged every step
        sampled_in = {e["round"] for e in events if e["event"] == "round_start" and int(node) in e["clients"]}
        assert set(entry["rounds"]) == sampled_in
        assert entry["requested_steps"] >= max(entry["reported_steps"], ledger[node]["replied_steps"]), entry
        if int(node) not in ever_dropped:
            assert entry["requested_steps"] >= STEPS * len(sampled_in), entry
        assert entry["epsilon"] >= entry["own_epsilon"] - 1e-12
    assert record["privacy"]["epsilon"] == max(e["epsilon"] for e in per_node.values())
    ends = {e["round"]: e["time"] for e in events if e["event"] == "round"}
    starts = {}
    for e in events:
        if e["event"] in ("round_start", "round"):
            starts.setdefault(e["round"], e["time"])
    walls = [round(ends[r] - (ends[r - 1] if r > 1 else starts[1]), 1) for r in sorted(ends)]
    print(f"FAULT {name}: wall {wall:.1f} s (run wall {record['cost']['wall_s']:.1f} s), rounds' walls {walls} s, "
          f"drops {[(e['round'], e.get('reason', '')[:90]) for e in events if e['event'] == 'dropped']}, "
          f"refused rounds {sorted(refused)}", flush=True)
    return record, events


def dropped_in(events: list[dict], rnd: int) -> set[int]:
    return {e["node"] for e in events if e["event"] == "dropped" and e["round"] == rnd and e.get("node") is not None}


def test_no_fault_baseline(tmp_path):
    """The same run without a fault: the wall time the faults are compared with."""
    with Scenario(tmp_path) as s:
        wall = s.finish(s.submit())
    _, events = check_record(s, "none (baseline)", wall)
    assert not [e for e in events if e["event"] in ("dropped", "refused")]


def test_supernode_killed_mid_round_and_restarted(tmp_path):
    with Scenario(tmp_path) as s:
        proc = s.submit()
        s.wait_for_step(2, 1, proc)
        killed = s.fed.kill_node(0)
        assert killed
        time.sleep(5)
        # same key: the same node, a fresh process without the old state; restarted every 5 s until the
        # SuperLink takes the key again (the dead node must first miss its heartbeats)
        attempts, took = s.fed.restart_node(0)
        print(f"  SuperNode 0 back after {5 + took:.0f} s ({attempts} starts)")
        wall = s.finish(proc)
    record, events = check_record(s, "SuperNode SIGKILL + restart after 5 s", wall)
    lost = dropped_in(events, 2)
    assert len(lost) == 1, events
    (node,) = lost
    assert not dropped_in(events, 1)
    per_node = record["privacy"]["dp"]["per_node"]
    entry = per_node[str(node)]
    # its own accountant died with it; the ledger still charges it as much as a node that never failed
    peers = [e["epsilon"] for n, e in per_node.items() if n != str(node) and e["rounds"] == entry["rounds"]]
    if peers:  # sampled in the same rounds as some node that never failed
        assert entry["epsilon"] >= min(peers) - 1e-12, per_node
    # back before round 3 began, the restarted node is sampled, and its peers reject it at the key stage
    # (its new process has a new identity key, they pinned the old one): round 3 is refused too, with no
    # round_start; back later, round 3 samples the 2 others
    back = [e for e in events if e["event"] == "round_start" and e["round"] == 3]
    rejected = [e["reason"] for e in events if e["event"] == "dropped" and e["round"] == 3 and e.get("node") is None
                and str(node) in e.get("reason", "") and "identity key changed" in e["reason"]]
    assert back or rejected or 3 in {e["round"] for e in events if e["event"] == "refused"}, events
    print(f"  restarted node {node} sampled in round 3: {bool(back) and node in back[-1]['clients']}, "
          f"rejected at round 3's key stage (identity key changed): {bool(rejected)}, "
          f"dropped in round 3: {node in dropped_in(events, 3)}")


def test_supernode_that_never_comes_back(tmp_path):
    with Scenario(tmp_path) as s:
        proc = s.submit()
        s.wait_for_step(2, 1, proc)
        assert s.fed.kill_node(2)
        wall = s.finish(proc)
    _, events = check_record(s, "SuperNode SIGKILL, never back", wall)
    (node,) = dropped_in(events, 2)
    round3 = [e for e in events if e["event"] == "round_start" and e["round"] == 3][-1]["clients"]
    assert node not in round3 or node in dropped_in(events, 3)  # not sampled again, or dropped again


def test_serverapp_killed_mid_round_and_resumed(tmp_path):
    """The resumed run answers its key stage and, with a plan that leaves room for the re-run round, finishes.

    A resumed run is a new Flower run: each client's ``context.state`` (its accountant) is new,
    so it charges every row for each step the ledger holds (round 1 and the interrupted
    round's sent steps). The default plan's cap (1 participation per row here) leaves no row
    room for the re-run: tests/test_deploy_resume.py shows that run stopping with its
    ``budget_spent`` record. ``dp.max-participations`` = the planned steps (noise for every
    row in every step) leaves room, and the run finishes all its rounds.
    """
    with Scenario(tmp_path, **{"dp.max-participations": ROUNDS * STEPS}) as s:
        proc = s.submit()
        s.wait_for_step(2, 1, proc)
        ledger_before = json.loads((s.out / "privacy-ledger.json").read_text())["nodes"]
        apps = [pid for pid in netns_pids(s.wan.superlink_ns)
                if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert apps, "no flwr-serverapp process in the SuperLink's namespace"
        for pid in apps:
            os.kill(pid, signal.SIGKILL)
        try:
            first_rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # `flwr run --stream` may wait on a run that no longer progresses
            proc.send_signal(signal.SIGTERM)
            first_rc = proc.wait(timeout=30)
        second = s.submit("flwr-run-resumed.log")
        wall = s.finish(second)
    print(f"  first attempt's flwr exit code {first_rc}")
    record, events = check_record(s, "ServerApp SIGKILL + resubmit", wall)
    assert [e["round"] for e in events if e["event"] == "resume"] == [1]
    after = events[[e["event"] for e in events].index("resume"):]
    # every SuperNode answered the resumed run's key stage (before the fix: 2 or 3 of 3 gave no reply)
    assert not [e for e in after if "no reply before comm.timeout" in e.get("reason", "")], after
    assert not [e for e in after if e["event"] in ("refused", "budget_spent", "error")], after
    # the interrupted attempt's charge stays: the resumed run reloaded the ledger written before each push
    # of the killed attempt (round 2 included) and only added to it
    for node, entry in record["privacy"]["dp"]["per_node"].items():
        before = ledger_before[node]
        assert 2 in before["rounds"] and before["requested_steps"] > STEPS, before
        assert entry["requested_steps"] >= before["requested_steps"], (entry, before)


def test_loss_on_one_link(tmp_path):
    with Scenario(tmp_path) as s:
        s.wan.shape(0, loss=0.05)
        wall = s.finish(s.submit())
        stats = s.wan.relay.stats[0]
    _, events = check_record(s, "5 % loss on one link", wall)
    assert stats.stalled > 0 and stats.stalled / stats.segments == pytest.approx(0.05, abs=0.03), stats
    print(f"  link 0: {stats.stalled} of {stats.segments} segments held back one RTO; "
          f"drops {[e for e in events if e['event'] == 'dropped']}")


def test_link_cut_for_30_seconds(tmp_path):
    # comm.timeout (120 s) above the cut: the node is waited for; a cut longer than comm.timeout drops it
    with Scenario(tmp_path) as s:
        proc = s.submit()
        s.wait_for_step(2, 1, proc)
        s.wan.cut(1)
        time.sleep(30)
        s.wan.restore(1)
        wall = s.finish(proc)
    _, events = check_record(s, "one link down for 30 s", wall)
    print(f"  drops after the cut: {[e for e in events if e['event'] == 'dropped']}")
