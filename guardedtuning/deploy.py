"""Flower's deployment engine: certificates, SuperNode keys, and a local federation.

The app runs unchanged on a long-running ``flower-superlink`` and one SuperNode per
client, each given its data partition through its node config
(``--node-config "partition-id=I num-partitions=N"``); ``flwr run . <connection>`` submits
it. docs/deployment.md walks through a multi-machine setup; this module makes the pieces:

- :func:`make_certificates`: a CA and a SuperLink certificate (TLS for every API);
- :func:`make_supernode_keys`: one EC key pair per SuperNode (SuperNode authentication:
  the SuperLink, started with ``--enable-supernode-auth``, admits only registered keys);
- :func:`write_connection`: the ``flwr`` CLI's ``config.toml`` entry for a SuperLink;
- :class:`LocalFederation`: a SuperLink and N SuperNodes as real processes on this
  machine (TLS and authentication on by default), ``flwr run`` against it, and a stop
  that ends every process it started, by PID. They end too when the process that started
  them dies without stopping them (SIGKILL included): each gets a parent-death signal and
  a watchdog process ends whatever carries the federation's marker (see
  :mod:`guardedtuning.launcher`).

SuperNodes run as ``python -m guardedtuning.clients.warm_node supernode`` (Flower's
SuperNode with prompt polling and a warm ClientApp process; see that module) unless
``warm=False``, which runs Flower's stock ``flower-supernode``. The warm command itself
becomes the stock one when :mod:`guardedtuning.compat`'s gate is off (an untested Flower,
or ``GUARDEDTUNING_FLOWER_COMPAT=off`` in the environment, which every process started
here inherits).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from guardedtuning.errors import GuardedTuningError
from guardedtuning.launcher import (
    FLWR_ENV,
    Watchdog,
    free_port,
    parent_death_preexec,
    script,
    signal_group,
    stop_processes,
)

MARKER = "GUARDEDTUNING_DEPLOYMENT"  # set on every process a LocalFederation starts


# ---------------------------------------------------------------------------------------
# Certificates and keys


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA (its certificate goes to every SuperNode and to ``flwr``) and
    the SuperLink's certificate and key."""

    ca: Path
    ca_key: Path
    server: Path
    server_key: Path


def make_certificates(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), *,
                      days: int = 365) -> Certificates:
    """A self-signed CA and a SuperLink certificate for ``hosts`` (names or IP addresses).

    ``hosts`` must hold every address SuperNodes and ``flwr`` use to reach the SuperLink
    (the certificate's subject alternative names); keep ``127.0.0.1``: the SuperLink's own
    ServerApp process connects there.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise GuardedTuningError("certificate hosts are empty; pass the SuperLink's address, e.g. --host 10.0.0.5")
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "GuardedTuning deployment CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    def private_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    out = Certificates(ca=folder / "ca.crt", ca_key=folder / "ca.key", server=folder / "server.pem",
                       server_key=folder / "server.key")
    out.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.server.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for path, k in ((out.ca_key, ca_key), (out.server_key, key)):
        path.write_bytes(private_pem(k))
        path.chmod(0o600)
    return out


def make_supernode_keys(folder: Path, count: int, *, prefix: str = "supernode") -> list[tuple[Path, Path]]:
    """``count`` EC (P-384) key pairs in OpenSSH format: ``(private, public)`` paths.

    The private key stays on its SuperNode (``--auth-supernode-private-key``); the public
    key is registered with the SuperLink (``flwr supernode register <key>.pub``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if count < 1:
        raise GuardedTuningError(f"number of SuperNode keys is {count}; pass a positive count")
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = folder / f"{prefix}-{i}", folder / f"{prefix}-{i}.pub"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
        private.chmod(0o600)
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH) + b"\n")
        pairs.append((private, public))
    return pairs


def write_connection(home: Path, name: str, address: str, *, root_certificates: Path | None) -> Path:
    """``<home>/config.toml`` naming SuperLink ``name`` at ``address`` (the default one).

    ``root_certificates`` is the CA certificate; ``None`` writes an insecure connection.
    """
    home.mkdir(parents=True, exist_ok=True)
    security = (f'root-certificates = "{root_certificates.resolve()}"' if root_certificates is not None
                else "insecure = true")
    path = home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n')
    return path


# ---------------------------------------------------------------------------------------
# A SuperLink and N SuperNodes on this machine


@dataclass
class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes as processes on this machine.

    Files (certificates, keys, Flower homes, logs) go under ``root``. With ``tls`` the
    SuperLink serves every API over TLS with a fresh CA; with ``auth`` (needs ``tls``)
    it admits only the SuperNodes whose keys were registered. :meth:`stop` ends every
    process started here: each process group, then whatever still carries this
    federation's marker in its environment (Flower's SuperExec and app processes). If the
    process holding this object dies first, a :class:`~guardedtuning.launcher.Watchdog`
    (started by :meth:`start`) ends them.
    """

    root: Path
    num_nodes: int
    tls: bool = True
    auth: bool = True
    warm: bool = True
    name: str = "guardedtuning-deploy"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    port: int = 0
    certs: Certificates | None = None
    watchdog: Watchdog | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        if self.num_nodes < 1:
            raise GuardedTuningError(f"number of SuperNodes is {self.num_nodes}; pass a positive number")
        if self.auth and not self.tls:
            raise GuardedTuningError("SuperNode authentication needs TLS; drop --insecure or pass --no-auth")

    @property
    def cli_home(self) -> Path:
        """``FLWR_HOME`` for ``flwr`` commands (its ``config.toml`` names this federation)."""
        return self.root / "cli"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLWR_ENV)
        env.update({"FLWR_HOME": str(home), MARKER: str(self.root)})
        # the SuperLink's ServerApp and every SuperNode share this machine's cores: torch's
        # default (a thread per core in each process) oversubscribes them, which made the
        # server's top step 20x and the clients' steps 4x slower than with a fair share
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (self.num_nodes + 1))))
        # Flower starts its helpers (flower-superexec, flwr-serverapp) by name
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _spawn(self, cmd: list[str], log_name: str, home: Path, *, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        home.mkdir(parents=True, exist_ok=True)
        log = (self.root / "logs" / log_name).open("ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(home),  # noqa: S603
                                cwd=cwd or self.root, start_new_session=True, preexec_fn=parent_death_preexec())
        log.close()
        self.procs.append(proc)
        return proc

    def start(self, *, timeout: float = 120.0) -> None:
        """Start the SuperLink, register the SuperNodes' keys, start the SuperNodes."""
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        if self.watchdog is None:
            self.watchdog = Watchdog(MARKER, str(self.root), log=self.root / "logs" / "watchdog.log")
            self.watchdog.start()
        if self.tls:
            self.certs = make_certificates(self.root / "certificates")
        self.port = free_port()
        cmd = [script("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        if self.certs is not None:
            cmd += ["--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.server),
                    "--ssl-keyfile", str(self.certs.server_key)]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        superlink = self._spawn(cmd, "superlink.log", self.root / "superlink")
        self._wait_healthy(superlink, timeout)
        write_connection(self.cli_home, self.name, self.address,
                         root_certificates=self.certs.ca if self.certs is not None else None)
        keys = make_supernode_keys(self.root / "keys", self.num_nodes) if self.auth else []
        for _, public in keys:
            self.flwr("supernode", "register", str(public), self.name, timeout=timeout)
        for i in range(self.num_nodes):
            self._spawn(self.supernode_command(i, keys[i][0] if keys else None), f"supernode-{i}.log",
                        self.root / "nodes" / f"node-{i}")

    def supernode_kind(self) -> str:
        """``"warm"``, or ``"stock (<why>)"``: what the SuperNodes run (the warm command execs the stock one
        on a Flower version :mod:`guardedtuning.compat` does not know)."""
        if not self.warm:
            return "stock (--stock)"
        from guardedtuning.clients.warm_node import stock_reason

        reason = stock_reason()
        return "warm" if reason is None else f"stock ({reason})"

    def supernode_command(self, i: int, private_key: Path | None) -> list[str]:
        """The command that starts SuperNode ``i`` (partition ``i`` of ``num_nodes``)."""
        if self.warm:
            cmd = [sys.executable, "-m", "guardedtuning.clients.warm_node", "supernode"]
        else:
            cmd = [script("flower-supernode")]
        cmd += ["--superlink", self.address, "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions={self.num_nodes}"]
        cmd += ["--root-certificates", str(self.certs.ca)] if self.certs is not None else ["--insecure"]
        if private_key is not None:
            cmd += ["--auth-supernode-private-key", str(private_key)]
        return cmd

    def _wait_healthy(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        scheme = "https" if self.certs is not None else "http"
        context = ssl.create_default_context(cafile=str(self.certs.ca)) if self.certs is not None else None
        deadline = time.monotonic() + timeout
        log = self.root / "logs" / "superlink.log"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=2, context=context) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"flower-superlink did not answer within {timeout:.0f}s; see {log}")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a ``flwr`` CLI command against this federation; raise with its output on failure."""
        res = subprocess.run([script("flwr"), *args], env=self.env(self.cli_home), cwd=self.root,  # noqa: S603
                             capture_output=True, text=True, timeout=timeout, preexec_fn=parent_death_preexec())
        if res.returncode != 0:
            raise RuntimeError(f"`flwr {' '.join(args)}` failed ({res.returncode}): {res.stdout[-2000:]}"
                               f"{res.stderr[-2000:]}")
        return res

    def run(self, app: Path, run_config: str, *, timeout: float = 1800.0,
            log_name: str = "flwr-run.log") -> int:
        """``flwr run . <this federation> --stream --run-config ...`` in ``app``; wait; return its exit code.

        ``run_config`` is what ``--run-config`` takes: ``'k=v k=v'`` or a TOML file. The
        output (Flower's and the ServerApp's log) goes to ``logs/<log_name>``.
        """
        proc = self._spawn([script("flwr"), "run", ".", self.name, "--stream", "--run-config", run_config],
                           log_name, self.cli_home, cwd=app)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGTERM)
            raise

    def stop(self) -> list[int]:
        """End every process this federation started; return the PIDs that had to be killed."""
        # Flower's SuperExec and app processes start sessions of their own; they still
        # carry our marker in their environment, which no other federation shares
        try:
            return stop_processes(self.procs, MARKER, str(self.root))
        finally:
            if self.watchdog is not None:
                self.watchdog.disarm()
                self.watchdog = None

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------
# `guardedtuning deploy ...`


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guardedtuning deploy",
                                description="Flower's deployment engine: TLS certificates, SuperNode keys, a fast "
                                            "SuperNode, a local federation (docs/deployment.md)")
    sub = p.add_subparsers(dest="what", required=True)
    certs = sub.add_parser("certs", help="a CA and a SuperLink certificate (ca.crt, server.pem, server.key)")
    certs.add_argument("folder", type=Path)
    certs.add_argument("--host", dest="hosts", action="append", default=[],
                       help="address SuperNodes use to reach the SuperLink (repeatable; 127.0.0.1 and "
                            "localhost are always included)")
    keys = sub.add_parser("keys", help="SuperNode authentication key pairs (supernode-I, supernode-I.pub)")
    keys.add_argument("folder", type=Path)
    keys.add_argument("--count", type=int, required=True, help="number of SuperNodes")
    sub.add_parser("supernode", add_help=False,
                   help="flower-supernode (same arguments) with prompt polling and a warm ClientApp process")
    local = sub.add_parser("local", help="a SuperLink and N SuperNodes on this machine; run a recipe on them")
    local.add_argument("--nodes", type=int, default=2, help="number of SuperNodes (default 2)")
    local.add_argument("--insecure", action="store_true", help="no TLS (and so no SuperNode authentication)")
    local.add_argument("--no-auth", action="store_true", help="TLS without SuperNode authentication")
    local.add_argument("--stock", action="store_true", help="Flower's stock flower-supernode (slow per step)")
    local.add_argument("--dir", type=Path, default=Path("runs/deploy"), help="files and logs (default runs/deploy)")
    local.add_argument("--serve", action="store_true",
                       help="start the federation and wait (Ctrl-C stops it); submit runs with `flwr run`")
    local.add_argument("--recipe", default="guarded", help="recipe to run (default guarded)")
    local.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override a run-config key (repeatable)")
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["supernode"]:
        from guardedtuning.clients.warm_node import supernode_main

        return supernode_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.what == "certs":
        certs = make_certificates(args.folder, tuple(dict.fromkeys([*args.hosts, "127.0.0.1", "localhost"])))
        print(f"CA {certs.ca} (give it to every SuperNode and to flwr)\nSuperLink certificate {certs.server}, "
              f"key {certs.server_key} (keep these two on the SuperLink's machine)")
        return 0
    if args.what == "keys":
        for private, public in make_supernode_keys(args.folder, args.count):
            print(f"{private} (SuperNode: --auth-supernode-private-key)  {public} (flwr supernode register)")
        return 0
    return _local(args)


def _local(args: argparse.Namespace) -> int:
    from guardedtuning.config import parse_set
    from guardedtuning.launcher import app_dir, write_run_config
    from guardedtuning.recipes import config_for

    root = args.dir.resolve()
    fed = LocalFederation(root, args.nodes, tls=not args.insecure, auth=not (args.insecure or args.no_auth),
                          warm=not args.stock)
    # a closed terminal or `kill` must still stop the federation (see `finally`)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    cfg = None
    if not args.serve:
        # every SuperNode is a client, and every client takes part in every round unless told otherwise
        sets = {"federation.num-clients": str(args.nodes), "federation.clients-per-round": str(args.nodes),
                "output.dir": str(root / "run"), **parse_set(args.sets)}
        cfg = config_for(args.recipe, sets)
        from guardedtuning.preflight import preflight

        preflight(cfg)
    try:
        fed.start()
        security = "TLS + SuperNode authentication" if fed.auth else "TLS" if fed.tls else "insecure"
        print(f"SuperLink {fed.address} ({security}), {args.nodes} SuperNodes "
              f"({fed.supernode_kind()}); logs in {root / 'logs'}", flush=True)
        if cfg is None:
            print(f"submit runs with:  FLWR_HOME={fed.cli_home} flwr run . {fed.name} --stream\n"
                  "Ctrl-C stops the federation", flush=True)
            while all(p.poll() is None for p in fed.procs):
                time.sleep(1)
            return 1
        out = Path(cfg.output.dir)
        out.mkdir(parents=True, exist_ok=True)
        rc = fed.run(app_dir(out), str(write_run_config(cfg, out / "run-config.toml")))
    except KeyboardInterrupt:
        return 130
    finally:
        fed.stop()
    results = Path(cfg.output.dir) / "results.json"
    if rc != 0 or not results.exists():
        print(f"run failed (flwr exit code {rc}); see {root / 'logs' / 'flwr-run.log'}", file=sys.stderr)
        return 1
    record = json.loads(results.read_text())
    if "stopped" in record:  # e.g. a resumed run whose clients' DP budgets are spent
        print(f"the run stopped after round {record['stopped']['after_round']}: {record['stopped']['message']}")
    cost = record["cost"]
    wall, overhead = cost.get("step_wall_s_median"), cost.get("step_overhead_s_median")
    print(f"results: {results}" + (f"; step wall {wall * 1000:.0f} ms, overhead {overhead * 1000:.0f} ms (medians)"
                                   if wall is not None and overhead is not None else ""))
    return 0
