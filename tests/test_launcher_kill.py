"""The launcher's own processes under a hard kill (issue 17, item 4).

``guardedtuning run`` starts a SuperLink (which starts Flower's SuperExec, the simulation and
Ray) and ``flwr run``, each in a session of its own. These tests SIGKILL the launcher, which
gets no chance to stop anything, and check that every process of that run still ends within
seconds and stops writing into the output folder, and that a second run cannot share the
output folder with a live one (the lock in ``output.dir``) but takes a dead one's over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from guardedtuning.launcher import FLWR_ENV, processes_with_env
from guardedtuning.recipes._split_family import BASELINE

SIZES = {**BASELINE, "model.name": "tiny-bert", "model.max-length": 32, "data.train-size": 240,
         "data.test-size": 60, "federation.num-clients": 3, "federation.clients-per-round": 3,
         "train.batch-size": 8, "train.lr": 5e-3, "train.server-lr": 5e-3}
SIZES = {k: v for k, v in SIZES.items() if k.startswith(("model.", "data.", "federation.", "train.", "split.layer"))}
GONE_WITHIN_S = 15.0


def _command(out: Path, rounds: int, steps: int, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "guardedtuning.cli", "run", "--recipe", "split", "--out", str(out)]
    for k, v in {**SIZES, "federation.rounds": rounds, "train.local-steps": steps}.items():
        args += ["--set", f"{k}={v}"]
    for s in extra:
        args += ["--set", s]
    return args


def _launch(out: Path, log: Path, rounds: int = 3, steps: int = 12) -> subprocess.Popen[bytes]:
    """``guardedtuning run`` in a process group (and session) of its own, as a terminal would start it."""
    with log.open("wb") as fh:
        return subprocess.Popen(_command(out, rounds, steps), stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **FLWR_ENV}, start_new_session=True)


def _rounds_done(out: Path) -> list[int]:
    path = out / "events.jsonl"
    if not path.exists():
        return []
    done = []
    for line in path.read_text().splitlines():
        ev = json.loads(line) if line.endswith("}") else {}
        if ev.get("event") == "round":
            done.append(ev["round"])
    return done


def _wait_for_round(proc: subprocess.Popen[bytes], out: Path, log: Path, k: int, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while k not in _rounds_done(out):
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before round {k}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no round {k} within {timeout:.0f}s: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def _of_run(out: Path) -> list[int]:
    """Live processes of the run writing into ``out``: they carry its FLWR_HOME."""
    return processes_with_env("FLWR_HOME", str(out / ".flwr"))


def _describe(pids: list[int]) -> list[str]:
    rows = []
    for pid in pids:
        try:
            rows.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:160]!r}")
        except OSError:
            rows.append(f"{pid}: gone")
    return rows


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent PID, session id, start time) of a live process; None when gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[3]), int(fields[19]))


def _family(root: int, seeds: list[int]) -> dict[int, int]:
    """Every live process descending from ``root`` or in a session of one of ``seeds``: PID -> start time.

    Whatever the SuperLink's simulation and Ray start, whether or not it kept our environment.
    """
    table = {int(e.name): st for e in Path("/proc").iterdir() if e.name.isdigit() and (st := _stat(int(e.name)))}
    sessions = {table[pid][1] for pid in seeds if pid in table}
    family, grew = {root} | set(seeds), True
    while grew:
        more = {pid for pid, (ppid, sid, _) in table.items() if ppid in family or sid in sessions} - family
        family |= more
        grew = bool(more)
    return {pid: table[pid][2] for pid in family if pid in table}


def _alive(family: dict[int, int]) -> list[int]:
    return [pid for pid, start in family.items() if (st := _stat(pid)) is not None and st[2] == start]


def _kill_by_pid(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _sigkill_launcher(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the launcher and its own process group: what `kill -9 -<pgid>` in a shell does."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def cleanup():
    """Processes of the runs under ``out`` folders registered here are SIGKILLed by PID at teardown."""
    outs: list[Path] = []
    procs: list[subprocess.Popen[bytes]] = []
    yield outs, procs
    for p in procs:
        if p.poll() is None:
            _kill_by_pid([p.pid])
            p.wait(timeout=10)
    for _ in range(3):
        for out in outs:
            _kill_by_pid(_of_run(out))
            pids = processes_with_env("GUARDEDTUNING_WATCHDOG", str(out))
            _kill_by_pid(pids)
        time.sleep(0.5)


@pytest.mark.e2e
def test_sigkill_of_the_launcher_ends_every_process_of_its_run(tmp_path, cleanup):
    """Before the fix the SuperLink (own session) survived indefinitely and finished round 3 unattended."""
    outs, procs = cleanup
    out, log = tmp_path / "run", tmp_path / "launcher.log"
    outs.append(out)
    launcher = _launch(out, log, rounds=3, steps=40)
    procs.append(launcher)
    _wait_for_round(launcher, out, log, 1)
    started = _of_run(out)
    assert len(started) >= 3, _describe(started)  # SuperLink, SuperExec, simulation, flwr run, Ray ...
    # only the launcher's own group: the SuperLink and `flwr run` are in sessions of their own
    assert all(os.getpgid(pid) != launcher.pid for pid in started if Path(f"/proc/{pid}").exists())
    assert len(processes_with_env("GUARDEDTUNING_WATCHDOG", str(out))) == 1  # its watchdog, in a session of its own
    family = _family(launcher.pid, started)  # Ray's processes too, with or without our environment
    family.pop(launcher.pid, None)
    assert len(family) >= len(started)
    _sigkill_launcher(launcher)
    killed_at = time.monotonic()
    while (left := _of_run(out) + _alive(family)) and time.monotonic() - killed_at < GONE_WITHIN_S:
        time.sleep(0.25)
    gone_s = time.monotonic() - killed_at
    assert left == [], f"alive {GONE_WITHIN_S:.0f}s after the launcher's SIGKILL: {_describe(sorted(set(left)))}"
    print(f"{len(family)} processes of the run gone {gone_s:.1f}s after the launcher's SIGKILL")
    # nothing writes into the output folder any more
    events = out / "events.jsonl"
    size = events.stat().st_size
    time.sleep(5)
    assert events.stat().st_size == size
    assert 3 not in _rounds_done(out) and not (out / "results.json").exists()
    # nor does a watchdog remain once it has done its work
    deadline = time.monotonic() + 10
    while processes_with_env("GUARDEDTUNING_WATCHDOG", str(out)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert processes_with_env("GUARDEDTUNING_WATCHDOG", str(out)) == []


@pytest.mark.e2e
def test_a_second_run_is_refused_while_the_first_lives_and_takes_a_dead_ones_lock_over(tmp_path, cleanup):
    outs, procs = cleanup
    out, log = tmp_path / "run", tmp_path / "first.log"
    outs.append(out)
    rounds, steps = 8, 80  # 4 x 40 took 10-20 s a round before; with the faster top pass the first run ended first
    first = _launch(out, log, rounds, steps)
    procs.append(first)
    _wait_for_round(first, out, log, 1)
    # the same command again (before the lock it started a second SuperLink and simulation on this folder)
    second = subprocess.run(_command(out, rounds, steps), capture_output=True, text=True, timeout=120,
                            env={**os.environ, **FLWR_ENV})
    said = second.stdout + second.stderr
    assert second.returncode == 2, said[-3000:]
    assert str(first.pid) in said and str(out) in said and "output.dir" in said, said
    assert (out / "superlink.log").read_text().count("Starting Flower SuperLink") == 1  # it started nothing
    # the refused run left the live one alone: it goes on
    size = (out / "events.jsonl").stat().st_size
    deadline = time.monotonic() + 60
    while (out / "events.jsonl").stat().st_size == size and time.monotonic() < deadline:
        time.sleep(0.25)
    assert first.poll() is None and (out / "events.jsonl").stat().st_size > size
    assert rounds not in _rounds_done(out), "the first run finished before it could be killed: make rounds longer"

    _sigkill_launcher(first)
    # the rerun takes the dead run's lock over (after the dead run's processes are gone), resumes and finishes
    rerun = subprocess.run(_command(out, rounds, steps), capture_output=True, text=True, timeout=600,
                           env={**os.environ, **FLWR_ENV})
    said = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, said[-3000:]
    assert "stale lock" in said and str(first.pid) in said, said[-3000:]
    assert "resuming after round" in said
    assert json.loads((out / "results.json").read_text())["history"][-1]["round"] == rounds
    assert _of_run(out) == []
    assert (out / "guardedtuning.lock").read_text() == ""  # released at the end


def test_lock_refuses_a_live_owner_and_names_it(tmp_path):
    """A live holder (another process) is refused with its PID and the fix; a dead one's lock is taken over."""
    from guardedtuning.errors import ConfigError
    from guardedtuning.launcher import LOCK_NAME, OutputLock, process_start_time

    out = tmp_path / "run"
    out.mkdir()
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from guardedtuning.launcher import OutputLock\n"
         f"lock = OutputLock(Path({str(out)!r})); lock.acquire(); Path({str(ready)!r}).touch(); time.sleep(600)"])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(ConfigError) as info:
            OutputLock(out, stale_wait_s=1).acquire()
        message = str(info.value)
        assert str(holder.pid) in message and str(out) in message and "output.dir" in message, message
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == holder.pid and owner["start"] == process_start_time(holder.pid)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    lock = OutputLock(out)
    with pytest.warns(UserWarning, match=f"stale lock.*{holder.pid}"):
        lock.acquire()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert (out / LOCK_NAME).read_text() == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cleanly released lock is taken without a warning
        OutputLock(out).acquire()


def test_lock_owner_identity_survives_pid_reuse(tmp_path):
    """A lock file naming a live PID with another start time is someone else's process: stale."""
    from guardedtuning.launcher import LOCK_NAME, OutputLock, process_start_time

    out = tmp_path / "run"
    out.mkdir()
    me = os.getpid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": me, "start": process_start_time(me) - 1}))
    lock = OutputLock(out)
    with pytest.warns(UserWarning, match="stale lock"):
        lock.acquire()
    lock.release()



@pytest.mark.e2e
def test_sigkill_of_a_local_federations_owner_ends_its_superlink_and_supernodes(tmp_path):
    """`LocalFederation` (guardedtuning deploy local): SuperLink and SuperNodes in sessions of their own."""
    from guardedtuning.deploy import MARKER

    root = (tmp_path / "fed").resolve()
    ready = tmp_path / "ready"
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from pathlib import Path; from guardedtuning.deploy import LocalFederation\n"
         f"fed = LocalFederation(Path({str(root)!r}), 2); fed.start(); Path({str(ready)!r}).touch(); time.sleep(600)"],
        env={**os.environ, **FLWR_ENV}, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert owner.poll() is None, f"the federation did not start ({owner.returncode})"
            assert time.monotonic() < deadline, "the federation did not start within 180 s"
            time.sleep(0.25)
        started = processes_with_env(MARKER, str(root))
        assert len(started) >= 3, _describe(started)  # the SuperLink, its SuperExec, 2 SuperNodes ...
        _sigkill_launcher(owner)
        killed_at = time.monotonic()
        while (left := processes_with_env(MARKER, str(root))) and time.monotonic() - killed_at < GONE_WITHIN_S:
            time.sleep(0.25)
        assert left == [], f"alive {GONE_WITHIN_S:.0f}s after the owner's SIGKILL: {_describe(left)}"
    finally:
        if owner.poll() is None:
            _kill_by_pid([owner.pid])
            owner.wait(timeout=10)
        for _ in range(3):
            _kill_by_pid(processes_with_env(MARKER, str(root)))
            _kill_by_pid(processes_with_env("GUARDEDTUNING_WATCHDOG", str(root)))
            time.sleep(0.5)
