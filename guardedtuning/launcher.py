"""Start Flower's simulation engine for one run, and stop everything it started.

``guardedtuning run`` takes Flower's supported path, ``flwr run <app> <superlink>``, with
a SuperLink of its own: it starts ``flower-superlink --simulation`` on free local ports
(with ``FLWR_HOME`` inside the run's output folder), submits the app with the run's
config as a TOML file and the federation (number of SuperNodes, client resources) as
``--federation-config``, and stops the SuperLink's whole process group when the run
ends, fails or is interrupted. Nothing keeps running afterwards.

Nor when the launcher dies without a chance to stop anything (``kill -9``, the OOM killer):

- every process started here gets a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG,
  SIGTERM)`` in its ``preexec_fn``, see :func:`parent_death_preexec`). Linux sends it when
  the *thread* that forked the child ends, not the process, so it is set only when the
  main thread starts the child; children started from other threads rely on the watchdog;
- a :class:`Watchdog` process in a session of its own waits on a pipe from the launcher
  (end of file: the launcher died) and polls its PID and start time; when the launcher is
  gone it sends SIGTERM, then (3 s later) SIGKILL, to every process of the launch's
  :class:`ProcessFamily`: those that carry the launch's marker in their environment (the
  SuperLink, Flower's SuperExec and simulation, Ray's processes, ``flwr run``: all inherit
  it, whatever session they run in), their descendants and the members of the sessions
  they lead (Ray's agents, whose environment reads back clobbered). flower-superlink has no
  ``--parent-pid`` option (flwr 1.42; its SuperExec and app processes have one, with the
  SuperLink as parent, and end by SIGINT when it is gone), so the watchdog is ours;
- :class:`OutputLock`: ``guardedtuning run`` (and the sweeps, through
  :func:`run_to_completion`) hold an ``fcntl.flock`` on ``<output.dir>/guardedtuning.lock``,
  which names the owner's PID and start time. The watchdog inherits the lock, so the folder
  stays locked until the dead launcher's processes are gone; a second run on a live run's
  folder gets a ConfigError, one on a dead run's folder waits for that cleanup and takes
  the stale lock over with a warning.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from guardedtuning.config import PACKAGE_DIR, RunConfig, default_flat_config
from guardedtuning.errors import ConfigError

FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


LAUNCH_MARKER = "GUARDEDTUNING_LAUNCH"  # one value per FlowerRun: what its watchdog and stop() end
WATCHDOG_MARKER = "GUARDEDTUNING_WATCHDOG"  # set on a watchdog: the output folder (or marker) it guards
LOCK_NAME = "guardedtuning.lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


# ---------------------------------------------------------------------------------------
# Processes that end with their launcher


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22); ``None`` if gone.

    A PID and its start time name one process: a reused PID has a later start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    if fields[0] == "Z":
        return None  # a zombie has ended; only its exit status is left
    return int(fields[19])


def process_alive(pid: int, start: int | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` (see :func:`process_start_time`) lives."""
    now = process_start_time(pid)
    return now is not None and (start is None or now == start)


_prctl: Callable[..., int] | None = None


def parent_death_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes Linux send ``sig`` to the child when its launcher dies.

    ``prctl(PR_SET_PDEATHSIG)`` fires when the *thread* that forked the child ends, which
    for the main thread is when the process ends; from any other thread it would fire when
    that thread returns, so this is ``None`` there (and off Linux): the :class:`Watchdog`
    covers those children. The setting survives ``exec`` and is not inherited by the
    child's own children (they carry the launch marker for the watchdog).
    """
    global _prctl
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    if _prctl is None:  # looked up before any fork: the child only calls it
        fn = ctypes.CDLL(None, use_errno=True).prctl
        fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_int
        _prctl = fn
    prctl, parent = _prctl, os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died between fork and prctl
            os._exit(128 + sig)

    return preexec


def watchdog_command(parent_pid: int, parent_start: int | None, pipe_fd: int, env_key: str, env_value: str,
                     grace_s: float) -> list[str]:
    """The command line of a :class:`Watchdog` process."""
    return [sys.executable, "-m", "guardedtuning.launcher", "watchdog", "--parent-pid", str(parent_pid),
            "--parent-start", str(parent_start if parent_start is not None else -1), "--pipe-fd", str(pipe_fd),
            "--env", f"{env_key}={env_value}", "--grace", str(grace_s)]


@dataclass
class Watchdog:
    """A process in a session of its own that ends a launch's processes if the launcher dies first.

    It ends every process whose environment has ``env_key=env_value`` once the launcher is
    gone: SIGTERM, ``grace_s`` seconds, then SIGKILL until none is left. :meth:`disarm`
    (after the launcher stopped them itself) lets it exit without doing anything.
    ``keep_fds`` are inherited and held until it exits (the :class:`OutputLock`'s file).
    """

    env_key: str
    env_value: str
    log: Path | None = None
    grace_s: float = 3.0
    label: str | None = None  # its own environment's GUARDEDTUNING_WATCHDOG (default: env_value)
    proc: subprocess.Popen[bytes] | None = None
    _pipe: int | None = None

    def start(self, keep_fds: tuple[int, ...] = ()) -> None:
        read, write = os.pipe()  # both non-inheritable: only the watchdog gets `read`, by pass_fds
        env = {k: v for k, v in os.environ.items() if k != self.env_key}
        env[WATCHDOG_MARKER] = self.label if self.label is not None else self.env_value
        out = self.log.open("ab") if self.log is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                watchdog_command(os.getpid(), process_start_time(os.getpid()), read, self.env_key, self.env_value,
                                 self.grace_s),
                pass_fds=(read, *keep_fds), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)  # survives a kill of the launcher's process group
        finally:
            os.close(read)
            if self.log is not None:
                out.close()  # type: ignore[union-attr]
        self._pipe = write

    def disarm(self, timeout: float = 10.0) -> None:
        """Tell the watchdog the launcher stopped everything itself; wait for it to exit."""
        if self._pipe is not None:
            try:
                os.write(self._pipe, b"done\n")
            except OSError:
                pass
            os.close(self._pipe)
            self._pipe = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _watch(args: argparse.Namespace) -> int:
    """The watchdog's loop: wait until the launcher is gone, then end the launch's processes."""
    for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's Ctrl-C or hang-up is for the launcher
        signal.signal(sig, signal.SIG_IGN)
    key, _, value = args.env.partition("=")
    start = None if args.parent_start < 0 else args.parent_start
    family = ProcessFamily(key, value)
    said = b""
    while True:
        family.scan()  # while the launch lives: its sessions are known before their leaders die
        ready, _, _ = select.select([args.pipe_fd], [], [], 1.0)
        if ready:
            chunk = os.read(args.pipe_fd, 64)
            said += chunk
            if b"done" in said:
                return 0
            if not chunk:
                break  # end of file: every holder of the pipe's write end is gone
        if not process_alive(args.parent_pid, start):
            break
    left = family.scan()
    print(f"{time.strftime('%H:%M:%S')} watchdog: launcher PID {args.parent_pid} is gone; ending {len(left)} "
          f"processes of {key}={value} (sessions {sorted(family.sessions)}): {left}", flush=True)
    for pid in left:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.grace
    while family.scan() and time.monotonic() < deadline:
        time.sleep(0.2)
    killed: set[int] = set()
    quiet, deadline = 0, time.monotonic() + 60
    while quiet < 3 and time.monotonic() < deadline:  # three empty looks in a row: nothing respawned
        left = family.scan()
        quiet = 0 if left else quiet + 1
        for pid in left:
            _kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.2)
    print(f"{time.strftime('%H:%M:%S')} watchdog: done; SIGKILL to {sorted(killed)}"
          + ("" if quiet >= 3 else f"; still alive: {family.scan()}"), flush=True)
    return 0 if quiet >= 3 else 1


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class StaleLockWarning(UserWarning):
    """An output folder's lock was left by a run that died; it was taken over."""


class OutputLock:
    """An exclusive lock on an output folder: one live run writes into it at a time.

    ``fcntl.flock`` on ``<out>/guardedtuning.lock`` (the kernel drops it when every holder
    of the file is gone, however it ended) plus the owner's PID and start time written
    inside, for the message. A folder locked by a live process raises ConfigError; one
    locked by a dead launcher whose watchdog is still stopping its processes is waited
    for (up to ``stale_wait_s``); a stale lock is taken over with a :class:`StaleLockWarning`.
    """

    def __init__(self, out: Path, *, stale_wait_s: float = 60.0) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.stale_wait_s = stale_wait_s
        self.fd: int | None = None

    def _owner(self, fd: int) -> dict:
        try:
            data = os.pread(fd, 4096, 0).decode()
            owner = json.loads(data) if data.strip() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}

    def acquire(self) -> None:
        """Take the lock or raise :class:`~guardedtuning.errors.ConfigError` naming its live owner."""
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._take(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _take(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._wait_for_dead_owner(fd)
        owner = self._owner(fd)
        if owner:
            warnings.warn(f"taking over the stale lock {self.path} of a run that died (PID {owner['pid']}, not "
                          f"alive, its processes gone); what it left in {self.out} stays: a run resumes from its "
                          f"checkpoint unless output.resume=false", StaleLockWarning, stacklevel=3)
        me = os.getpid()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": me, "start": process_start_time(me), "argv": sys.argv[:8],
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode(), 0)

    def _wait_for_dead_owner(self, fd: int) -> None:
        """The lock is held: refuse a live owner; wait while a dead one's watchdog cleans up."""
        deadline = time.monotonic() + self.stale_wait_s
        owner = self._owner(fd)
        if not owner:  # the holder may not have written its PID yet
            time.sleep(1.0)
            owner = self._owner(fd)
        while True:
            if not owner or process_alive(owner["pid"], owner.get("start")):
                who = f"PID {owner['pid']}" if owner else "a process that did not write its PID"
                raise ConfigError(
                    f"output.dir {self.out} is in use by a live run ({who}, lock {self.path}); wait for it to "
                    f"finish, stop it ({'kill ' + str(owner['pid']) if owner else 'see `fuser ' + str(self.path) + '`'}"
                    f"), or pass another output folder (--out DIR or --set output.dir=DIR)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                owner = self._owner(fd) or owner  # a new holder may have written itself in meanwhile
                if process_alive(owner["pid"], owner.get("start")):
                    continue  # refused above, with the new holder's PID
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"output.dir {self.out}: the run that held it (PID {owner['pid']}) is dead but its lock "
                        f"{self.path} is still held after {self.stale_wait_s:.0f}s (its watchdog still stopping "
                        f"its processes?); see {self.out / 'watchdog.log'}, stop what holds the lock (`fuser "
                        f"{self.path}`), or pass another output folder (--out DIR or --set output.dir=DIR)") from None
                time.sleep(0.2)

    def release(self) -> None:
        """Empty the lock file (a clean end: no warning for the next run) and unlock it."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------------------
# A SuperLink and `flwr run` for one run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def script(name: str) -> str:
    """A console script of this Python environment (works without an activated venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_run_config(cfg: RunConfig, path: Path) -> Path:
    """The full flat run config as a TOML file for ``flwr run --run-config``."""
    lines = [f'"{k}" = {toml_value(v)}' for k, v in cfg.flat().items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def app_dir(out: Path) -> Path:
    """The Flower app folder: the source tree when installed editable, else a generated one."""
    source = PACKAGE_DIR.parent
    pyproject = source / "pyproject.toml"
    if pyproject.is_file():
        with pyproject.open("rb") as fh:
            if "flwr" in tomllib.load(fh).get("tool", {}):
                return source
    gen = out / ".flwr-app"
    gen.mkdir(parents=True, exist_ok=True)
    defaults = "\n".join(f'"{k}" = {toml_value(v)}' for k, v in default_flat_config().items())
    (gen / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "guardedtuning-app"\nversion = "0.1.0"\ndependencies = ["guardedtuning"]\n\n'
        '[tool.flwr.app]\npublisher = "guardedtuning"\n\n[tool.flwr.app.components]\n'
        'serverapp = "guardedtuning.server_app.server_app:app"\n'
        'clientapp = "guardedtuning.clients.client_app:app"\n\n'
        f"[tool.flwr.app.config]\n{defaults}\n"
    )
    (gen / "app_marker.py").write_text('"""Generated Flower app folder; the code is the installed guardedtuning."""\n')
    return gen


@dataclass
class FlowerRun:
    """A SuperLink and a ``flwr run`` started for one run; :meth:`stop` ends both.

    :meth:`start` first locks the output folder (:class:`OutputLock`) and starts a
    :class:`Watchdog`; every process started here carries ``GUARDEDTUNING_LAUNCH=<marker>``
    (one value per instance), which :meth:`stop` and the watchdog end.
    """

    cfg: RunConfig
    out: Path
    verbose: bool = False
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    flwr: subprocess.Popen[bytes] | None = None
    marker: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
    lock: OutputLock | None = None
    watchdog: Watchdog | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLWR_ENV)
        env["FLWR_HOME"] = str(self.out / ".flwr")
        env[LAUNCH_MARKER] = self.marker
        # the SuperLink starts flower-superexec by name: this environment's scripts must be on PATH
        scripts = str(Path(sys.executable).parent)
        if scripts not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = scripts + os.pathsep + env.get("PATH", "")
        return env

    def start(self, run_config: str | None = None) -> None:
        """Start the SuperLink, then ``flwr run``.

        ``run_config`` is passed to ``flwr run --run-config`` as given (``'k=v k=v'``); by
        default the whole config goes as a TOML file, so defaults cannot drift. Raises
        ConfigError, before starting anything, when another run holds the output folder.
        """
        self._guard()
        home = self.out / ".flwr"
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = (self.out / "superlink.log").open("ab")
        superlink = subprocess.Popen(
            [script("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--host", "127.0.0.1", "--port", str(port),
             "--control-api-address", f"127.0.0.1:{free_port()}",
             "--fleet-api-address", f"127.0.0.1:{free_port()}",
             "--disable-runtime-dependency-installation"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True,
            preexec_fn=parent_death_preexec(),
        )
        self.procs.append(superlink)
        self._wait_healthy(port, superlink)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "guardedtuning"\n\n[superlink.guardedtuning]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        fed = (f"num-supernodes={self.cfg.federation.num_clients} "
               f"client-resources-num-cpus={self.cfg.sim.num_cpus} "
               f"client-resources-num-gpus={self.cfg.sim.num_gpus}")
        if self.cfg.sim.ray_num_cpus > 0:
            fed += f" init-args-num-cpus={self.cfg.sim.ray_num_cpus}"
        if self.cfg.sim.ray_num_gpus >= 0:
            fed += f" init-args-num-gpus={self.cfg.sim.ray_num_gpus}"
        if run_config is None:
            run_config = str(write_run_config(self.cfg, self.out / "run-config.toml"))
        cmd = [script("flwr"), "run", str(app_dir(self.out)), "guardedtuning", "--stream",
               "--run-config", run_config, "--federation-config", fed]
        flog = None if self.verbose else (self.out / "flower.log").open("ab")
        self.flwr = subprocess.Popen(cmd, stdout=flog, stderr=subprocess.STDOUT if flog else None,
                                     env=self.env(), start_new_session=True, preexec_fn=parent_death_preexec())
        self.procs.append(self.flwr)

    def _guard(self) -> None:
        """Lock the output folder, refuse a dead run's leftovers, start the watchdog (holding the lock)."""
        lock = OutputLock(self.out)
        lock.acquire()
        try:
            home = str(self.out / ".flwr")
            # holding the lock, any process with this FLWR_HOME is a dead run's that its watchdog missed
            if left := processes_with_env("FLWR_HOME", home):
                raise ConfigError(
                    f"output.dir {self.out}: processes of an earlier run in this folder are still alive (PIDs "
                    f"{left}, FLWR_HOME={home}); stop them (kill {' '.join(map(str, left))}) or pass another "
                    f"output folder (--out DIR or --set output.dir=DIR)")
            watchdog = Watchdog(LAUNCH_MARKER, self.marker, log=self.out / "watchdog.log", label=str(self.out))
            assert lock.fd is not None
            watchdog.start(keep_fds=(lock.fd,))
        except BaseException:
            lock.release()
            raise
        self.lock, self.watchdog = lock, watchdog

    def _wait_healthy(self, port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; see {self.out / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"flower-superlink did not start within {timeout:.0f}s; see {self.out / 'superlink.log'}")

    def poll(self) -> int | None:
        return None if self.flwr is None else self.flwr.poll()

    def stop(self) -> None:
        """SIGTERM each process group we started, then SIGKILL what is left; then unlock the folder.

        A no-op (it ends nothing) when :meth:`start` was refused the folder's lock.
        """
        if self.lock is None:
            return
        try:
            # Ray starts some of its processes in sessions of their own; they still carry
            # this launch's marker, which no other run shares
            stop_processes(self.procs, LAUNCH_MARKER, self.marker)
        finally:
            if self.watchdog is not None:
                self.watchdog.disarm()
                self.watchdog = None
            self.lock.release()
            self.lock = None


def processes_with_env(key: str, value: str) -> list[int]:
    """Live processes whose environment has ``key=value`` (Linux /proc; else none)."""
    needle = f"{key}={value}".encode()
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and ") Z " not in (entry / "stat").read_text():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _process_table() -> dict[int, tuple[str, int, int, int]]:
    """Every process: PID -> (state, parent PID, session id, start time), from ``/proc/<pid>/stat``."""
    table = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return table
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        table[int(entry.name)] = (fields[0], int(fields[1]), int(fields[3]), int(fields[19]))
    return table


class ProcessFamily:
    """The processes of one launch: those whose environment has ``key=value``, their
    descendants, and the members of the sessions they lead.

    The environment alone misses some: Ray's agents (``ray::DashboardAgent``, ...) set their
    process title over their environment block, so ``/proc/<pid>/environ`` loses some
    variables, ours among them, at random. They stay in the session of the process that
    started them (Flower's SuperExec, which carries the marker and leads that session), and
    a session id outlives its leader, so :meth:`scan` remembers the sessions (and processes)
    it saw: call it before the launch's processes die, and again while ending them.
    """

    def __init__(self, key: str, value: str) -> None:
        self.key, self.value = key, value
        self.sessions: set[int] = set()
        self.seen: dict[int, int] = {}  # PID -> start time (a reused PID starts later)

    def scan(self) -> list[int]:
        """The family's live PIDs now (never this process)."""
        table = _process_table()
        marked = {pid for pid in processes_with_env(self.key, self.value) if pid in table}
        # only sessions a marked process leads: a marked process in a terminal's session (a
        # subprocess without a session of its own) must not take the terminal's shell with it
        self.sessions |= {pid for pid in marked if table[pid][2] == pid}
        family = marked | {pid for pid, start in self.seen.items() if pid in table and table[pid][3] == start}
        grew = True
        while grew:
            more = {pid for pid, (_, ppid, sid, _) in table.items()
                    if (ppid in family or sid in self.sessions) and pid not in family}
            family |= more
            grew = bool(more)
        family.discard(os.getpid())
        self.seen.update({pid: table[pid][3] for pid in family})
        return sorted(pid for pid in family if table[pid][0] != "Z")


def signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group of ``p`` (started with ``start_new_session``); gone is fine."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_processes(procs: list[subprocess.Popen[bytes]], env_key: str, env_value: str) -> list[int]:
    """End processes we started, and every process of their :class:`ProcessFamily`
    (environment ``env_key=env_value``, descendants, sessions they lead).

    SIGTERM to each started process group (last started first), up to 10 s, then SIGKILL to
    the groups; then, for up to 15 s, SIGKILL to any process of the family still alive
    (those started in sessions of their own). Returns the PIDs that had to be killed.
    """
    family = ProcessFamily(env_key, env_value)
    family.scan()  # before anything dies: the sessions, and who descends from whom
    for p in reversed(procs):
        signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    killed = []
    for p in procs:
        if p.poll() is None:
            killed.append(p.pid)
        signal_group(p, signal.SIGKILL)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 15
    while (left := family.scan()) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.2)
    return killed


def run_to_completion(cfg: RunConfig, *, timeout: float = 3600) -> dict:
    """Run ``cfg`` on the simulation engine, wait, stop everything, return its results record."""
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    run = FlowerRun(cfg, out)
    try:
        run.start()
        assert run.flwr is not None
        run.flwr.wait(timeout=timeout)
    finally:
        run.stop()
    return json.loads((out / "results.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """``python -m guardedtuning.launcher watchdog ...``: the :class:`Watchdog` process."""
    p = argparse.ArgumentParser(prog="python -m guardedtuning.launcher")
    sub = p.add_subparsers(dest="what", required=True)
    w = sub.add_parser("watchdog", help="end a launch's processes when its launcher dies")
    w.add_argument("--parent-pid", type=int, required=True)
    w.add_argument("--parent-start", type=int, default=-1, help="the parent's start time (clock ticks; -1: unknown)")
    w.add_argument("--pipe-fd", type=int, required=True, help="read end of the launcher's pipe")
    w.add_argument("--env", required=True, metavar="KEY=VALUE", help="the marker of the processes to end")
    w.add_argument("--grace", type=float, default=3.0, help="seconds between SIGTERM and SIGKILL")
    return _watch(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
