"""Start Flower's simulation engine for one run, and stop everything it started.

``guardedtuning run`` takes Flower's supported path, ``flwr run <app> <superlink>``, with
a SuperLink of its own: it starts ``flower-superlink --simulation`` on free local ports
(with ``FLWR_HOME`` inside the run's output folder), submits the app with the run's
config as a TOML file and the federation (number of SuperNodes, client resources) as
``--federation-config``, and stops the SuperLink's whole process group when the run
ends, fails or is interrupted. Nothing keeps running afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from guardedtuning.config import PACKAGE_DIR, RunConfig, default_flat_config

FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


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
    """A SuperLink and a ``flwr run`` started for one run; :meth:`stop` ends both."""

    cfg: RunConfig
    out: Path
    verbose: bool = False
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    flwr: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLWR_ENV)
        env["FLWR_HOME"] = str(self.out / ".flwr")
        # the SuperLink starts flower-superexec by name: this environment's scripts must be on PATH
        scripts = str(Path(sys.executable).parent)
        if scripts not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = scripts + os.pathsep + env.get("PATH", "")
        return env

    def start(self, run_config: str | None = None) -> None:
        """Start the SuperLink, then ``flwr run``.

        ``run_config`` is passed to ``flwr run --run-config`` as given (``'k=v k=v'``); by
        default the whole config goes as a TOML file, so defaults cannot drift.
        """
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
                                     env=self.env(), start_new_session=True)
        self.procs.append(self.flwr)

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
        """SIGTERM each process group we started, then SIGKILL what is left."""
        # Ray starts some of its processes in sessions of their own; they still carry
        # our FLWR_HOME, which no other run shares
        stop_processes(self.procs, "FLWR_HOME", str(self.out / ".flwr"))


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


def signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group of ``p`` (started with ``start_new_session``); gone is fine."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_processes(procs: list[subprocess.Popen[bytes]], env_key: str, env_value: str) -> list[int]:
    """End processes we started, and every process whose environment has ``env_key=env_value``.

    SIGTERM to each started process group (last started first), up to 10 s, then SIGKILL to
    the groups; then, for up to 15 s, SIGKILL to any process still carrying the marker
    (those started in sessions of their own). Returns the PIDs that had to be killed.
    """
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
    while (left := processes_with_env(env_key, env_value)) and time.monotonic() < deadline:
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
