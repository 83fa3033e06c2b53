"""A federation whose SuperLink and SuperNodes each have a network stack of their own.

:class:`Wan` (a context manager) builds, inside this machine, a small network of Linux
network namespaces and removes all of it on exit, also when the body fails:

- ``<prefix>-sl``: the SuperLink's namespace, interface ``wan0`` at ``10.213.0.2/24``;
- ``<prefix>-n<i>``: SuperNode ``i``'s namespace, interface ``wan0`` at ``10.213.<i+1>.2/24``;
- ``<prefix>-rt``: the "internet" between them: the peer of every ``wan0`` (``sl`` at
  ``10.213.0.1``, ``n<i>`` at ``10.213.<i+1>.1``) and a TCP relay (:class:`Relay`) that
  listens on ``10.213.<i+1>.1:<port>`` for SuperNode ``i`` and forwards to the SuperLink at
  ``10.213.0.2:<port>``. IP forwarding is off in it, so the relay is the only path: every
  byte between a SuperNode and the SuperLink crosses two veth pairs (node -> rt, rt -> sl)
  and the relay. ``flwr`` (the CLI) runs in ``rt`` too and reaches the SuperLink over its veth.

Each namespace also has its own loopback (the SuperLink's ServerApp and each SuperNode's
ClientApp process talk to their parent there, as on separate machines).

Shaping, per SuperNode link (:meth:`Wan.shape`, changeable while a run is going):

- bandwidth: a ``tbf`` qdisc on both ends of the node's veth pair (``rate`` bit/s each way);
- delay and jitter: the relay holds every chunk it reads for ``rtt / 2`` (plus a uniform
  jitter in ``[-jitter, +jitter]``, clipped at 0) in each direction, in order, so a request
  and its answer take one RTT more than on the bare link;
- loss: the relay terminates TCP on both sides, so it cannot drop a byte without breaking
  the stream, and TCP above it would never see a drop. "Loss ``p``" here is what a lost
  packet costs TCP: each MSS-sized segment (1448 bytes) is, with probability ``p``, held
  back by one retransmission timeout (``max(0.2 s, rtt)``: Linux's minimum RTO), and the
  segments behind it wait for it (head-of-line blocking, as TCP delivers in order). Fast
  retransmit, which often recovers in one RTT, is not modelled: this is the pessimistic case;
- a cut (:meth:`Wan.cut`): the router side of the node's veth goes down (``ip link set
  down``): the node's packets go nowhere (TCP retransmits, new connections time out) until
  :meth:`Wan.restore`.

The machine's ``netem`` qdisc would do delay and loss in the kernel; it does not exist on
the machines this was built on (``tc qdisc add ... netem`` fails), hence the relay.

Everything is named ``gtns<pid>-...`` (the PID of the process that built it): on entry,
namespaces left by a process that no longer runs are removed. Nothing here sends a packet
to an address outside the namespaces it made (and loopback).

:func:`unavailable` says why namespaces cannot be used here (not root, no ``ip``, ...), for
``pytest.skip``. :class:`NetnsFederation` is :class:`guardedtuning.deploy.LocalFederation`
(TLS, SuperNode authentication, warm SuperNodes, PID-based stop) with each process started
through ``ip netns exec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from guardedtuning.deploy import LocalFederation, make_certificates, make_supernode_keys, write_connection
from guardedtuning.launcher import script

CLONE_NEWNET = 0x40000000
PORT = 9093  # the SuperLink's one HTTP port (Fleet, Control and ServerAppIo APIs), in its namespace
NODE_PORT = 9094  # each SuperNode's local ClientAppIo API, on its namespace's loopback
MSS = 1448
MIN_RTO = 0.2  # Linux's TCP_RTO_MIN


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or ``None`` when they can (checked by making one)."""
    if sys.platform != "linux":
        return f"network namespaces are Linux-only (this is {sys.platform})"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2's `ip` and `tc` are not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    name = f"gtns{os.getpid()}-probe"
    res = _ip("netns", "add", name, check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    try:
        res = _ip("-n", name, "link", "add", "gta", "type", "veth", "peer", "name", "gtb", check=False)
        if res.returncode != 0:
            return f"`ip link add ... type veth` failed: {res.stderr.strip()}"
        res = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "gta", "root", "tbf",
                              "rate", "1gbit", "burst", "128kb", "latency", "50ms"], capture_output=True, text=True)
        if res.returncode != 0:
            return f"`tc qdisc add ... tbf` failed: {res.stderr.strip()}"
    finally:
        _ip("netns", "delete", name, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(prefix: str = "gtns") -> list[str]:
    """Delete the namespaces ``<prefix><pid>-*`` whose process ``pid`` is gone; return their names."""
    res = _ip("netns", "list", check=False)
    removed = []
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(prefix) or "-" not in name:
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    return removed


def enter_netns(name: str) -> None:
    """Move the calling *thread* into network namespace ``name`` (sockets it creates then live there)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(name: str, fn, *args, timeout: float = 60.0):
    """``fn(*args)`` on a fresh thread inside network namespace ``name``; its result (or its exception)."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            enter_netns(name)
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} in namespace {name} took over {timeout:.0f}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


# ---------------------------------------------------------------------------------------
# The relay


@dataclass
class Shape:
    """What the relay does to one link's traffic (read on every chunk: change it any time)."""

    rtt: float = 0.0  # seconds added to a round trip (half each way)
    jitter: float = 0.0  # seconds, uniform in [-jitter, +jitter] on each one-way delay
    loss: float = 0.0  # probability that a segment waits one retransmission timeout
    paused: bool = False  # forward nothing (bytes wait in the relay)

    def rto(self) -> float:
        return max(MIN_RTO, self.rtt + 4 * self.jitter)


@dataclass
class LinkStats:
    connections: int = 0
    bytes_up: int = 0  # node -> SuperLink
    bytes_down: int = 0
    segments: int = 0
    stalled: int = 0  # segments held back by a "loss"


class Relay:
    """Asyncio TCP relays on a thread inside namespace ``netns``: ``listen[i] -> upstream``.

    ``shapes[i]`` shapes listener ``i``'s connections (both directions). ``seed`` makes
    the jitter and the loss draws reproducible.
    """

    def __init__(self, netns: str, listen: list[tuple[str, int]], upstream: tuple[str, int], *,
                 seed: int = 0) -> None:
        self.netns, self.listen, self.upstream = netns, listen, upstream
        self.shapes = [Shape() for _ in listen]
        self.stats = [LinkStats() for _ in listen]
        self.rng = random.Random(seed)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()  # strong references: asyncio keeps only weak ones

    def _keep(self, task: asyncio.Task) -> asyncio.Task:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name=f"relay-{self.netns}", daemon=True)
        self.thread.start()
        if not self._ready.wait(30):
            raise TimeoutError(f"the relay in {self.netns} did not start within 30s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(10)

    def _main(self) -> None:
        try:
            enter_netns(self.netns)
            asyncio.run(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        servers = []
        for i, (host, port) in enumerate(self.listen):
            servers.append(await asyncio.start_server(
                lambda r, w, i=i: self._connection(i, r, w), host, port, reuse_address=True))
        self._ready.set()
        await self._stop.wait()
        for s in servers:
            s.close()
        for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            task.cancel()

    async def _connection(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._keep(asyncio.current_task())
        self.stats[i].connections += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        tasks = [self._keep(asyncio.create_task(self._pump(i, reader, up_w, up=True))),
                 self._keep(asyncio.create_task(self._pump(i, up_r, writer, up=False)))]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(t.exception() is not None for t in done):  # a reset on one side ends both
                for t in pending:
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for w in (writer, up_w):
                w.close()

    async def _pump(self, i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        loop = asyncio.get_running_loop()
        shape, stats = self.shapes[i], self.stats[i]
        queue: deque[tuple[float, bytes]] = deque()
        wake = asyncio.Event()
        done = False

        async def sender() -> None:
            while True:
                while not queue:
                    if done:
                        return
                    wake.clear()
                    await wake.wait()
                due = queue[0][0]
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                while shape.paused:
                    await asyncio.sleep(0.02)
                now, out = loop.time(), []
                while queue and queue[0][0] <= now:
                    out.append(queue.popleft()[1])
                writer.write(b"".join(out))
                await writer.drain()

        task = self._keep(asyncio.create_task(sender()))
        last = 0.0
        try:
            while True:
                while shape.paused:  # a cut link takes nothing in either
                    await asyncio.sleep(0.02)
                data = await reader.read(1 << 16)
                if not data:
                    break
                if up:
                    stats.bytes_up += len(data)
                else:
                    stats.bytes_down += len(data)
                now = loop.time()
                for k in range(0, len(data), MSS):
                    one_way = shape.rtt / 2
                    if shape.jitter:
                        one_way = max(0.0, one_way + self.rng.uniform(-shape.jitter, shape.jitter))
                    due = now + one_way
                    stats.segments += 1
                    if shape.loss and self.rng.random() < shape.loss:
                        due += shape.rto()
                        stats.stalled += 1
                    last = max(last, due)  # in order: nothing overtakes a held-back segment
                    queue.append((last, data[k:k + MSS]))
                wake.set()
        finally:
            done = True
            wake.set()
            with contextlib.suppress(Exception):
                await task
            with contextlib.suppress(Exception):
                writer.write_eof()


# ---------------------------------------------------------------------------------------
# The namespaces


@dataclass
class Wan:
    """The SuperLink's namespace, ``num_nodes`` SuperNode namespaces and the relay between them.

    ``rate`` (e.g. ``"100mbit"``, ``None`` = no ``tbf``) shapes every node link in both
    directions; :meth:`shape` changes one link's delay, jitter and loss at any time.
    """

    num_nodes: int
    rate: str | None = None
    port: int = PORT
    seed: int = 0
    prefix: str = field(default_factory=lambda: f"gtns{os.getpid()}")
    made: list[str] = field(default_factory=list)
    relay: Relay | None = None

    @property
    def superlink_ns(self) -> str:
        return f"{self.prefix}-sl"

    @property
    def router_ns(self) -> str:
        return f"{self.prefix}-rt"

    def node_ns(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    superlink_ip = "10.213.0.2"

    def relay_ip(self, i: int) -> str:
        """The address SuperNode ``i`` uses for the SuperLink (the relay's end of its link)."""
        return f"10.213.{i + 1}.1"

    def node_ip(self, i: int) -> str:
        return f"10.213.{i + 1}.2"

    def superlink_address(self, i: int) -> str:
        return f"{self.relay_ip(i)}:{self.port}"

    def __enter__(self) -> Wan:
        remove_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        if self.num_nodes < 1 or self.num_nodes > 250:
            raise ValueError(f"num_nodes is {self.num_nodes}; pass 1 to 250")
        rt = self.router_ns
        for ns in (rt, self.superlink_ns, *[self.node_ns(i) for i in range(self.num_nodes)]):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # IP forwarding off in the router: nothing reaches the SuperLink except through the relay
        subprocess.run(["ip", "netns", "exec", rt, "sysctl", "-qw", "net.ipv4.ip_forward=0"], check=True)
        links = [(self.superlink_ns, "sl", 0)] + [(self.node_ns(i), f"n{i}", i + 1) for i in range(self.num_nodes)]
        for ns, peer, k in links:
            _ip("link", "add", "wan0", "netns", ns, "type", "veth", "peer", "name", peer, "netns", rt)
            _ip("-n", ns, "addr", "add", f"10.213.{k}.2/24", "dev", "wan0")
            _ip("-n", rt, "addr", "add", f"10.213.{k}.1/24", "dev", peer)
            _ip("-n", ns, "link", "set", "wan0", "up")
            _ip("-n", rt, "link", "set", peer, "up")
            if self.rate is not None and k > 0:
                self._tbf(ns, "wan0")
                self._tbf(rt, peer)
        self.relay = Relay(rt, [(self.relay_ip(i), self.port) for i in range(self.num_nodes)],
                           (self.superlink_ip, self.port), seed=self.seed)
        self.relay.start()

    def _tbf(self, ns: str, dev: str) -> None:
        bits = _rate_bits(self.rate)
        burst = max(64 * 1024, bits // 8 // 250)  # a 4 ms bucket, at least 64 KiB (tbf needs >= rate / HZ)
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                        self.rate, "burst", str(burst), "latency", "100ms"], check=True, capture_output=True)

    def set_rate(self, rate: str | None) -> None:
        """Change every node link's ``tbf`` rate (``None`` removes the qdisc), also while a run is going."""
        self.rate = rate
        for i in range(self.num_nodes):
            for ns, dev in ((self.node_ns(i), "wan0"), (self.router_ns, f"n{i}")):
                if rate is None:
                    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                                   capture_output=True)
                else:
                    self._tbf(ns, dev)

    def shape(self, i: int, **kw: float | bool) -> Shape:
        """Set SuperNode ``i``'s link's :class:`Shape` fields (``rtt``, ``jitter``, ``loss``, ``paused``)."""
        s = self.relay.shapes[i]
        for k, v in kw.items():
            if not hasattr(s, k):
                raise AttributeError(f"Shape has no field {k!r}; use rtt, jitter, loss or paused")
            setattr(s, k, v)
        return s

    def shape_all(self, **kw: float | bool) -> None:
        for i in range(self.num_nodes):
            self.shape(i, **kw)

    def cut(self, i: int) -> None:
        """Take SuperNode ``i``'s link down (the relay's side of its veth pair)."""
        _ip("-n", self.router_ns, "link", "set", f"n{i}", "down")

    def restore(self, i: int) -> None:
        _ip("-n", self.router_ns, "link", "set", f"n{i}", "up")

    def counters(self) -> dict[str, dict[str, int]]:
        """Bytes and packets through each namespace's ``wan0`` (``sl``, ``n0``, ...), from the kernel."""
        out = {}
        for name, ns in [("sl", self.superlink_ns)] + [(f"n{i}", self.node_ns(i)) for i in range(self.num_nodes)]:
            res = _ip("-n", ns, "-s", "-j", "link", "show", "wan0")
            st = json.loads(res.stdout)[0]["stats64"]
            out[name] = {"rx_bytes": st["rx"]["bytes"], "tx_bytes": st["tx"]["bytes"],
                         "rx_packets": st["rx"]["packets"], "tx_packets": st["tx"]["packets"]}
        return out

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        """Stop the relay and delete every namespace made here (their veths go with them)."""
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        while self.made:
            _ip("netns", "delete", self.made.pop(), check=False)


def _rate_bits(rate: str) -> int:
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, mult in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * mult)
    raise ValueError(f"rate {rate!r}: use a number with kbit, mbit or gbit, e.g. 100mbit")


# ---------------------------------------------------------------------------------------
# The federation on it


class NetnsFederation(LocalFederation):
    """:class:`LocalFederation` over a :class:`Wan`: the SuperLink in ``sl``, SuperNode ``i`` in ``n<i>``.

    The SuperLink listens on all its namespace's addresses; its certificate names the relay's
    addresses (what the SuperNodes dial), the SuperLink's own and ``127.0.0.1`` (its
    ServerApp). ``flwr`` runs in the router namespace (the workstation) and dials
    ``10.213.0.2`` directly.
    """

    def __init__(self, root: Path, wan: Wan, *, node_args: tuple[str, ...] = (), **kw) -> None:
        super().__init__(root, wan.num_nodes, **kw)
        self.wan = wan
        self.node_args = tuple(node_args)  # extra options of every warm SuperNode (e.g. --object-concurrency 2)
        kind = self.supernode_kind()
        if self.node_args and kind != "warm":
            raise ValueError(f"node_args {' '.join(self.node_args)}: the SuperNodes here are {kind}, which "
                             "drops the warm SuperNode's options (the run would equal the default path); "
                             "pass no node_args, or run with a Flower the warm SuperNode supports "
                             "(and warm=True)")
        self.port = wan.port
        self.node_procs: dict[int, subprocess.Popen[bytes]] = {}
        self.keys: list[tuple[Path, Path]] = []

    @property
    def address(self) -> str:  # what flwr (in the router namespace) dials
        return f"{self.wan.superlink_ip}:{self.port}"

    def _spawn_in(self, ns: str, cmd: list[str], log_name: str, home: Path, *,
                  cwd: Path | None = None) -> subprocess.Popen[bytes]:
        # `ip netns exec` execs the command (same PID): parent-death signal, marker and group stay
        return self._spawn(self.wan.exec_prefix(ns) + cmd, log_name, home, cwd=cwd)

    def start(self, *, timeout: float = 600.0) -> None:
        """As :meth:`LocalFederation.start`; ``timeout`` is generous: `flwr` takes minutes on a saturated machine."""
        from guardedtuning.deploy import MARKER
        from guardedtuning.launcher import Watchdog

        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        if self.watchdog is None:
            self.watchdog = Watchdog(MARKER, str(self.root), log=self.root / "logs" / "watchdog.log")
            self.watchdog.start()
        wan = self.wan
        hosts = (wan.superlink_ip, *[wan.relay_ip(i) for i in range(wan.num_nodes)], "127.0.0.1", "localhost")
        self.certs = make_certificates(self.root / "certificates", hosts)
        cmd = [script("flower-superlink"), "--host", "0.0.0.0", "--port", str(self.port),
               "--disable-runtime-dependency-installation", "--ssl-ca-certfile", str(self.certs.ca),
               "--ssl-certfile", str(self.certs.server), "--ssl-keyfile", str(self.certs.server_key)]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        superlink = self._spawn_in(wan.superlink_ns, cmd, "superlink.log", self.root / "superlink")
        self._wait_healthy_ns(superlink, timeout)
        write_connection(self.cli_home, self.name, self.address, root_certificates=self.certs.ca)
        self.keys = make_supernode_keys(self.root / "keys", self.num_nodes) if self.auth else []
        for _, public in self.keys:
            self.flwr("supernode", "register", str(public), self.name, timeout=timeout)
        for i in range(self.num_nodes):
            self.start_node(i)

    def start_node(self, i: int) -> subprocess.Popen[bytes]:
        """Start (or restart) SuperNode ``i`` in its namespace, with its registered key."""
        cmd = self.supernode_command(i, self.keys[i][0] if self.keys else None)
        proc = self._spawn_in(self.wan.node_ns(i), cmd, f"supernode-{i}.log", self.root / "nodes" / f"node-{i}")
        self.node_procs[i] = proc
        return proc

    def supernode_command(self, i: int, private_key: Path | None) -> list[str]:
        if self.warm:
            cmd = [sys.executable, "-m", "guardedtuning.clients.warm_node", "supernode"]
        else:
            cmd = [script("flower-supernode")]
        cmd += ["--superlink", self.wan.superlink_address(i), "--port", str(NODE_PORT),
                "--node-config", f"partition-id={i} num-partitions={self.num_nodes}",
                "--root-certificates", str(self.certs.ca)]
        if private_key is not None:
            cmd += ["--auth-supernode-private-key", str(private_key)]
        if self.warm:
            cmd += list(self.node_args)
        return cmd

    def restart_node(self, i: int, *, retry_s: float = 5.0, settle_s: float = 15.0,
                     deadline_s: float = 300.0) -> tuple[int, float]:
        """Start SuperNode ``i`` again until it stays up (a service manager's restart-on-failure).

        After a SIGKILL the SuperLink refuses the same key (``Failed to activate SuperNode``)
        until the dead node misses its heartbeats (Flower: 2 x 30 s); a start that exits
        within ``settle_s`` is retried after ``retry_s``. Returns (attempts, seconds taken).
        """
        t0 = time.monotonic()
        attempts = 0
        while time.monotonic() - t0 < deadline_s:
            attempts += 1
            proc = self.start_node(i)
            try:
                proc.wait(timeout=settle_s)
            except subprocess.TimeoutExpired:
                return attempts, time.monotonic() - t0
            time.sleep(retry_s)
        raise TimeoutError(f"SuperNode {i} did not come back within {deadline_s:.0f}s ({attempts} starts); "
                           f"see {self.root / 'logs' / f'supernode-{i}.log'}")

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to SuperNode ``i`` and its ClientApp process (everything started in its namespace)."""
        pids = netns_pids(self.wan.node_ns(i))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def _wait_healthy_ns(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        url = f"https://{self.address}/health"

        def probe() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as r:
                    return r.status == 200
            except OSError:
                return False

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; see "
                                   f"{self.root / 'logs' / 'superlink.log'}")
            if in_netns(self.wan.router_ns, probe):
                return
            time.sleep(0.3)
        raise RuntimeError(f"flower-superlink did not answer at {url} within {timeout:.0f}s")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.wan.exec_prefix(self.wan.router_ns) + [script("flwr"), *args],  # noqa: S603
                             env=self.env(self.cli_home), cwd=self.root, capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"`flwr {' '.join(args)}` failed ({res.returncode}): {res.stdout[-2000:]}"
                               f"{res.stderr[-2000:]}")
        return res

    def submit(self, app: Path, run_config: str, *, log_name: str = "flwr-run.log") -> subprocess.Popen[bytes]:
        """``flwr run . <federation> --stream`` from the router namespace; the process (not waited for)."""
        return self._spawn_in(self.wan.router_ns, [script("flwr"), "run", ".", self.name, "--stream",
                                                   "--run-config", run_config], log_name, self.cli_home, cwd=app)

    def run(self, app: Path, run_config: str, *, timeout: float = 1800.0, log_name: str = "flwr-run.log") -> int:
        proc = self.submit(app, run_config, log_name=log_name)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            raise


def netns_pids(ns: str) -> list[int]:
    """The PIDs of the processes in network namespace ``ns`` (``ip netns pids``)."""
    res = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in res.stdout.split()]
