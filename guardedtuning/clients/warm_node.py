"""A SuperNode that keeps split learning fast on Flower's deployment engine.

A split-learning step is one message to each sampled client and one reply. On Flower's
deployment engine (flwr 1.41/1.42) three things make each such message cost seconds,
however fast the ServerApp pulls (:mod:`guardedtuning.wire.exchange` already pulls
every ``comm.poll-interval``):

1. the SuperNode polls the SuperLink for messages, and after an empty poll it sleeps a
   fixed 3 s (``start_client_internal``); while its ClientApp computes, it checks for the
   reply every 0.5 s;
2. its SuperExec polls for tasks every second (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``);
3. every message is a task that SuperExec starts as a new ``flwr-clientapp`` process, which
   imports torch, transformers and the app (2.5 s on an idle 2-core CPU), then builds the
   model and the client's data before it computes anything.

Together a split step took 13 s with 2 clients of the tiny test model on an idle 2-core
CPU (``simulations/deploy_step_time.py``).

:func:`supernode_main` starts Flower's own ``flower-supernode`` (same arguments) with
``--isolation process`` and two changes:

- its fixed sleeps become a :class:`Backoff`: after a message arrives, the next polls
  follow quickly (``poll_min``, growing by ``growth`` per empty poll up to Flower's 3 s),
  so an idle SuperNode still polls as rarely as Flower's, and a busy one answers within
  milliseconds; the wait for the ClientApp's reply polls every ``poll_min``;
- instead of SuperExec, one long-lived process (:func:`runner_main`) acquires the tasks
  from the SuperNode's Runtime API and runs each ClientApp message in that same process,
  one at a time, with Flower's own steps (pull the task's message and context, install the
  FAB, load the ClientApp, call it, push the reply and the context back). Imports, base
  weights and tokenised data stay warm across messages, as in a simulation's Ray actor.
  Client state still lives in ``context.state``, which travels with every task as in
  Flower's own runner;
- over its link to the SuperLink, a message's objects are pulled and pushed up to
  ``--object-concurrency`` (16) at once instead of Flower's ``min(2, cores)`` (each batch
  is a round trip: a split step's 6 + 10 objects cost 8 of them before, 2 now), objects
  still being uploaded are retried as Flower retries them; with ``--early-wake on``
  (opt-in, off by default: no measurable gain, see :data:`EARLY_WAKE_HELP`) the runner is
  woken when the objects are stored, before Flower's loop confirms the receipt;
- a task that Flower's SuperNode loop leaves behind when a run stops while one of its
  messages is being received (its ServerApp died) is finished and its message dropped
  (:mod:`guardedtuning.clients.dead_runs`), so that the one-at-a-time runner does not wait on it
  and the next run (a resumed one) is answered.

The first, third and fourth of those changes (Flower's loop: polls, object transfers, early
wake, dead-run cleanup) are installed by
:func:`guardedtuning.clients.warm_transfers.patch_supernode_polling`; this module holds
the runner and the SuperNode's command line.

Every Flower internal used here is reached through :mod:`guardedtuning.compat`. When its
gate is off (a Flower version this was not written against, or
``GUARDEDTUNING_FLOWER_COMPAT=off``), or one of those internals is missing,
:func:`supernode_main` says so in its log and replaces itself with Flower's stock
``flower-supernode`` (same arguments, less this module's own ``OWN_OPTIONS``), so the
node still works, at Flower's speed. A warm runner that keeps failing on start ends the
SuperNode after a few tries instead of restarting forever.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from importlib import import_module
from pathlib import Path
from typing import Any

from guardedtuning import compat
from guardedtuning.clients.dead_runs import PushRecorder, token_refused
from guardedtuning.clients.warm_transfers import Backoff, patch_supernode_polling
from guardedtuning.compat import private as flower

FALLBACK_POLL_S = 10.0  # the runner's poll when the SuperNode wakes it up on every message
RUNNER_QUICK_EXIT_S = 30.0  # a runner that exits this soon after its start counts as failing to start
RUNNER_MAX_QUICK_EXITS = 3  # ... and after this many such exits in a row the SuperNode stops
log = logging.getLogger("guardedtuning.node")


# ---------------------------------------------------------------------------------------
# The warm ClientApp runner (stands in for SuperExec + one flwr-clientapp per message)


class TaskRunner:
    """Runs ClientApp tasks of one SuperNode in this process, one at a time."""

    def __init__(self, address: str, *, insecure: bool, root_certificates: bytes | None) -> None:
        self.address, self.insecure, self.root_certificates = address, insecure, root_certificates
        self.fab_hash: str | None = None
        self.app_dir: str | None = None
        self.app: Any = None

    def _client(self, token: str | None) -> tuple[Any, Any]:
        """A Runtime API client (with the task's token, if given) and its retry invoker."""
        interceptors: list[Any] = [flower("RuntimeVersionHttpInterceptor")(
            component_name="flwr-clientapp" if token else "SuperExec")]
        if token:
            interceptors.append(flower("RuntimeTokenHttpInterceptor")(token))
        retry = flower("make_simple_http_retry_invoker")()
        client = flower("RuntimeHttpClient").from_server_address(
            server_address=self.address, insecure=self.insecure, root_certificates=self.root_certificates,
            interceptors=interceptors, retry_invoker=retry)
        return client, retry

    def acquire(self, client: Any) -> str | None:
        """A task's token, or None when the SuperNode has no task for a ClientApp."""
        request = flower("AcquireTaskRequest")(supported_task_types=[flower("TaskType").CLIENT_APP])
        res = client.AcquireTask(request)
        return res.token if res.HasField("task") and res.token else None

    def _app(self, run: Any, fab: Any) -> Any:
        """The ClientApp of ``fab``, loaded once per FAB with Flower's loader.

        Like Flower's own runner, the app's code comes from the installed FAB (its folder
        goes first on ``sys.path``). Modules of the app's top-level package that came from
        elsewhere (this runner's own package on start, or an earlier FAB) are forgotten
        first, so a new FAB never runs with stale code; its per-process caches go with them.
        """
        if fab.hash_str == self.fab_hash:
            return self.app
        flower("install_from_fab")(fab.content, skip_prompt=True)
        app_dir = flower("get_project_dir")(run.fab_id, run.fab_version, fab.hash_str)
        ref = flower("get_project_config")(app_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
        forget_package(ref.split(":")[0].split(".")[0], keep_under=str(app_dir))
        if self.app_dir is not None and self.app_dir in sys.path:
            sys.path.remove(self.app_dir)
        load = flower("get_load_client_app_fn")(default_app_ref="", app_path=None, multi_app=True)
        self.app = load(run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash, self.app_dir = fab.hash_str, str(app_dir)
        log.info("loaded ClientApp %s from %s", ref, app_dir)
        return self.app

    def run_task(self, token: str) -> str:
        """Run one ClientApp message; return its sub-status (Flower's ``SubStatus``)."""
        from flwr.app import Error, Message

        sub_status, error_code = flower("SubStatus"), flower("ErrorCode")
        push_message, push_task_output = flower("push_message"), flower("push_task_output")
        client, retry = self._client(token)
        heartbeat = flower("HeartbeatSender")(flower("make_task_heartbeat_fn_http")(client))
        message = reply = context = None
        status, details = sub_status.FAILED, "ClientApp task failed"
        try:
            heartbeat.start()
            t0 = time.time()
            message, context, run, fab = flower("pull_task_input")(client)
            t1 = time.time()
            reply = self._app(run, fab)(message=message, context=context)
            status, details = sub_status.COMPLETED, ""
            log.debug("message created %.3f, task acquired %.3f, input pulled %.3f, handled %.3f",
                      message.metadata.created_at, t0, t1, time.time())
        except Exception as exc:  # noqa: BLE001 - the error goes back to the ServerApp, as Flower's does
            log.exception("ClientApp raised an exception")
            details = f"{type(exc)}:<'{exc}'>"
            if message is not None:
                reply = Message(Error(code=error_code.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                                reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001
                log.exception("failed to push the reply")
                status = sub_status.FAILED
            # the heartbeat stops while the task is still claimed: a heartbeat after the
            # task's output would find no claim and make Flower's sender raise SIGINT
            if heartbeat.is_running:
                heartbeat.stop()
            retry.max_tries = 1  # as Flower's runner does on exit: no retries for a finished task
            try:
                # Flower's push_task_output logs an httpx.HTTPError and returns: the recorder sees it
                recorder = PushRecorder(client)
                push_task_output(client=recorder, context=context, sub_status=status, details=details)
                if recorder.error is not None:
                    raise recorder.error
            except Exception as exc:
                if message is not None or not token_refused(exc):
                    # a live task's context.state (e.g. a DP-SGD client's accountant) would be lost
                    log.exception("failed to push the task's output; the runner stops (the SuperNode restarts it)")
                    raise
                log.warning("task discarded by the SuperNode (its run stopped while its message was received): "
                            "its token is revoked; the next task runs")
            finally:
                client.close()
            log.debug("reply and context pushed %.3f", time.time())
        return status

    def serve(self, backoff: Backoff, stop: threading.Event, wakeup_fd: int | None = None) -> None:
        """Acquire and run tasks until ``stop`` is set.

        Between empty polls it waits for the backoff's time, or less when ``wakeup_fd``
        (the read end of the SuperNode's pipe) says a message arrived.
        """
        client, _ = self._client(None)
        try:
            while not stop.is_set():
                token = self.acquire(client)
                if token is not None:
                    self.run_task(token)
                    backoff.reset()
                    continue
                if wakeup_fd is None:
                    stop.wait(backoff.next())
                # the SuperNode says when a message (and its content) is stored: acquiring
                # earlier would find the task but not yet its content (the SuperNode creates
                # the task before it pulls the content), so polls wait for the wakeup; the
                # timeout is only a fallback
                elif select.select([wakeup_fd], [], [], FALLBACK_POLL_S)[0]:
                    os.read(wakeup_fd, 4096)  # drain: one acquire serves every pending wakeup
        finally:
            client.close()


def forget_package(top: str, *, keep_under: str) -> list[str]:
    """Drop ``top`` and its submodules from ``sys.modules`` unless loaded from ``keep_under``."""
    gone = []
    for name, module in list(sys.modules.items()):
        if name != top and not name.startswith(top + "."):
            continue
        origin = getattr(module, "__file__", None) or ""
        if not origin.startswith(keep_under.rstrip("/") + "/"):
            del sys.modules[name]
            gone.append(name)
    return gone


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """End the runner when its SuperNode is gone (its parent PID changes)."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            os._exit(0)
        stop.wait(1.0)


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("guardedtuning-node: %(message)s"))
        log.addHandler(handler)
        # GUARDEDTUNING_NODE_DEBUG=1 logs each message's timeline (created, acquired, handled, pushed)
        log.setLevel(logging.DEBUG if os.environ.get("GUARDEDTUNING_NODE_DEBUG") == "1" else logging.INFO)
        log.propagate = False


def runner_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="guardedtuning-node-runner",
                                description="Run a SuperNode's ClientApp tasks in one warm process")
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    p.add_argument("--root-certificates", default=None, help="CA of the Runtime API's TLS certificate")
    p.add_argument("--preload", default="torch,transformers,peft",
                   help="comma-separated modules to import before the first task (the ClientApp's heavy "
                        "dependencies; the app itself comes from the run's FAB)")
    p.add_argument("--poll-min", type=float, default=0.002)
    p.add_argument("--poll-max", type=float, default=1.0)
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--wakeup-fd", type=int, default=None, help="read end of the SuperNode's wakeup pipe")
    args = p.parse_args(argv)
    _log_to_stderr()
    for name in filter(None, args.preload.split(",")):
        import_module(name.strip())
    # a task acquired by the fallback poll may still be storing its content: retry promptly
    log.info("runner object pulls: %s", compat.install_prompt_pulls("inflatable.pull_objects", args.poll_min))
    certs = open(args.root_certificates, "rb").read() if args.root_certificates else None  # noqa: SIM115
    runner = TaskRunner(args.runtime_api_address, insecure=certs is None, root_certificates=certs)
    stop = threading.Event()
    if args.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, stop), daemon=True).start()
    # Flower's task heartbeat raises SIGINT when it finds its task's claim gone, to end a
    # one-message process; here that would end every later message too. The runner stops
    # with its SuperNode (SIGTERM, or the parent check above), so SIGINT is only logged.
    signal.signal(signal.SIGINT, lambda *_: log.warning("SIGINT ignored: the runner stops with its SuperNode"))
    log.info("running ClientApp tasks of %s in process %d", args.runtime_api_address, os.getpid())
    runner.serve(Backoff(start=args.poll_min, limit=args.poll_max), stop, args.wakeup_fd)
    return 0


EARLY_WAKE_HELP = (
    "--early-wake on|off (default off): on starts the ClientApp once a message's objects are stored, before "
    "the receipt is confirmed to the SuperLink (one round trip sooner). Its gain was below the run-to-run noise "
    "in every measurement (docs/deployment.md, over a WAN). Risk: if the confirmation then fails, Flower fails "
    "the task while the ClientApp may already have computed; its reply is deleted, never sent (checked when "
    "Flower's loop sends it), and its step may be counted with nothing released (an over-count, never an "
    "under-count).")
"""What ``--early-wake`` does, its measured (non-)gain and its risk (the SuperNode's --help)."""

OWN_OPTIONS = ("--poll-min", "--poll-max", "--poll-growth", "--reply-poll", "--object-concurrency",
               "--early-wake")  # not flower-supernode's


def stock_reason() -> str | None:
    """Why this SuperNode must be Flower's stock ``flower-supernode``; None when the warm one can run."""
    g = compat.gate()
    if not g.enabled:
        return g.reason
    gone = compat.missing(compat.WARM_NODE_SYMBOLS)
    if gone:
        return f"flwr {g.flwr_version} lacks {', '.join(sorted(gone))}"
    node_state = flower("NodeState")
    lacking = [m for m in compat.NODESTATE_METHODS if not callable(getattr(node_state, m, None))]
    if lacking:
        return f"flwr {g.flwr_version}'s NodeState lacks {', '.join(lacking)}"
    return None


def stock_supernode_command(argv: list[str]) -> list[str]:
    """Flower's ``flower-supernode`` with ``argv``, less this module's own options and ``--isolation process``.

    ``--isolation process`` goes because no warm runner will connect to run the ClientApp:
    Flower's default (a ClientApp process per message, started by the SuperNode) runs it.
    """
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for option in OWN_OPTIONS:
        p.add_argument(option)
    p.add_argument("--isolation", default=None)
    ours, rest = p.parse_known_args(argv)
    if ours.isolation not in (None, "process"):
        rest += ["--isolation", ours.isolation]
    candidate = Path(sys.executable).parent / "flower-supernode"
    return [str(candidate) if candidate.exists() else "flower-supernode", *rest]


def _exec(cmd: list[str]) -> None:
    """Replace this process by ``cmd`` (same PID: whoever started this SuperNode still tracks it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(cmd[0], cmd)  # noqa: S606 - Flower's own console script, this environment's


def supernode_main(argv: list[str] | None = None) -> int:
    """``flower-supernode`` with fast polling and the warm runner (same arguments).

    Falls back to Flower's stock ``flower-supernode`` (this process is replaced by it) when
    :func:`stock_reason` gives a reason.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _log_to_stderr()
    reason = stock_reason()
    if reason is not None:
        cmd = stock_supernode_command(argv)
        log.warning("SuperNode: flower (%s): running Flower's stock flower-supernode (its 3 s polls and a "
                    "process per message; options %s are ignored)", reason, "/".join(OWN_OPTIONS))
        _exec(cmd)
        return 0  # only reached when _exec is replaced (tests)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9094)
    p.add_argument("--isolation", default=None)
    p.add_argument("--ssl-ca-certfile", default=None)
    p.add_argument("--poll-min", type=float, default=0.005,
                   help="first wait after a message before polling the SuperLink again (s)")
    p.add_argument("--poll-max", type=float, default=3.0, help="longest wait between polls when idle (s)")
    p.add_argument("--poll-growth", type=float, default=1.1, help="factor by which the wait grows per empty poll")
    p.add_argument("--reply-poll", type=float, default=0.002,
                   help="wait between checks for the ClientApp's reply (s)")
    p.add_argument("--object-concurrency", type=int, default=compat.OBJECT_CONCURRENCY,
                   help="objects of a message pulled/pushed at once over the link (Flower: 2)")
    p.add_argument("--early-wake", choices=("on", "off"), default="off", help=EARLY_WAKE_HELP)
    ours, rest = p.parse_known_args(argv)
    flower_supernode = flower("flower_supernode")

    if "-h" in rest or "--help" in rest:
        print("guardedtuning deploy supernode: flower-supernode with prompt polling and a warm ClientApp process\n"
              "(always --isolation process). Its own options: --poll-min S (first wait after a message, default "
              "0.005), --poll-growth F (default 1.1), --poll-max S (default 3), --reply-poll S (default 0.002), "
              f"--object-concurrency N (default {compat.OBJECT_CONCURRENCY}; Flower: 2).\n"
              f"{EARLY_WAKE_HELP}\n"
              f"With {compat.ENV_VAR}=off (or an untested Flower) it is Flower's stock flower-supernode.\n"
              "Every other option is flower-supernode's:\n")
        sys.argv = ["flower-supernode", "--help"]
        flower_supernode()
        return 0
    if ours.isolation not in (None, "process"):
        print(f"error: `--isolation {ours.isolation}`: this SuperNode runs its ClientApp in its own warm "
              "process; drop --isolation", file=sys.stderr)
        return 2
    try:
        backoff = Backoff(start=ours.poll_min, limit=ours.poll_max, growth=ours.poll_growth)
    except ValueError as exc:
        print(f"error: {exc}; pass --poll-min S and --poll-max S with 0 < S_min <= S_max, --poll-growth >= 1",
              file=sys.stderr)
        return 2
    if ours.object_concurrency < 1:
        print(f"error: `--object-concurrency {ours.object_concurrency}`: pass a count >= 1 (2 is Flower's own, "
              f"default {compat.OBJECT_CONCURRENCY})", file=sys.stderr)
        return 2
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    status = patch_supernode_polling(backoff, reply_poll=ours.reply_poll, wakeup_fd=wake_w,
                                     object_concurrency=ours.object_concurrency,
                                     wake_before_confirm=ours.early_wake == "on")
    log.info("SuperNode polling: %s", status)
    host = f"[{ours.host}]" if ":" in ours.host else ours.host
    runner_cmd = [sys.executable, "-m", "guardedtuning.clients.warm_node", "runner",
                  "--runtime-api-address", f"{host}:{ours.port}", "--parent-pid", str(os.getpid()),
                  "--wakeup-fd", str(wake_r)]
    if ours.ssl_ca_certfile:
        runner_cmd += ["--root-certificates", ours.ssl_ca_certfile]
    runner = _Runner(runner_cmd, wake_r)
    flwr_args = [*rest, "--host", ours.host, "--port", str(ours.port), "--isolation", "process"]
    if ours.ssl_ca_certfile:
        flwr_args += ["--ssl-ca-certfile", ours.ssl_ca_certfile]
    sys.argv = ["flower-supernode", *flwr_args]
    try:
        flower_supernode()
    finally:
        runner.stop()
    return 0


def _stop_this_supernode() -> None:
    """SIGTERM to this process: Flower's SuperNode handles it and exits."""
    os.kill(os.getpid(), signal.SIGTERM)


class _Runner:
    """The warm ClientApp process of a SuperNode, restarted if it exits on its own.

    A runner that exits within ``RUNNER_QUICK_EXIT_S`` of its start
    ``RUNNER_MAX_QUICK_EXITS`` times in a row cannot start (an import error, say):
    ``give_up`` is called (by default the SuperNode stops) instead of restarting forever.
    """

    def __init__(self, cmd: list[str], wake_r: int, *, give_up: Any = _stop_this_supernode,
                 settle_s: float = 1.0) -> None:
        self.cmd, self.wake_r, self.give_up, self.settle_s = cmd, wake_r, give_up, settle_s
        self.stopping = threading.Event()
        self.starts = 0
        self.proc = self._start()
        threading.Thread(target=self._watch, daemon=True, name="guardedtuning-runner-watch").start()

    def _start(self) -> subprocess.Popen[bytes]:
        self.started, self.starts = time.monotonic(), self.starts + 1
        return subprocess.Popen(self.cmd, pass_fds=(self.wake_r,))  # noqa: S603 - our module, this interpreter

    def _watch(self) -> None:
        quick_exits = 0
        while True:
            code = self.proc.wait()
            lived = time.monotonic() - self.started
            if self.stopping.wait(self.settle_s):
                return
            quick_exits = quick_exits + 1 if lived < RUNNER_QUICK_EXIT_S else 0
            if quick_exits >= RUNNER_MAX_QUICK_EXITS:
                log.error("the ClientApp process exited %d times within %g s of its start (last code %s); "
                          "stopping the SuperNode. See the errors above; Flower's stock SuperNode runs with "
                          "%s=off (or `guardedtuning deploy local --stock`)",
                          quick_exits, RUNNER_QUICK_EXIT_S, code, compat.ENV_VAR)
                self.give_up()
                return
            log.error("the ClientApp process exited (code %s); starting a new one", code)
            self.proc = self._start()

    def stop(self) -> None:
        self.stopping.set()
        self.proc.terminate()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("supernode", "runner"):
        print("usage: python -m guardedtuning.clients.warm_node {supernode,runner} [args]", file=sys.stderr)
        return 2
    try:
        return supernode_main(argv[1:]) if argv[0] == "supernode" else runner_main(argv[1:])
    except compat.FlowerCompatError as exc:  # a bad GUARDEDTUNING_FLOWER_COMPAT value: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
