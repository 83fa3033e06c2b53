"""Every private part of Flower and Opacus that GuardedTuning uses, behind one version gate.

Flower's public API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``,
``flwr.serverapp.strategy``) is imported directly where it is used. Everything else we
touch inside Flower, whether we call it or replace it, is named in :data:`FLOWER_PRIVATE`
and reached only through this module:

- :func:`private` resolves one of those names (``"module:attribute"``); names that are
  identifiers can also be imported, ``from guardedtuning.compat import TaskIdentity``;
- :func:`gate` says whether the installed Flower is one these parts were written against
  (:data:`SUPPORTED_FLWR`: 1.41.x and 1.42.x), or whether the gate was forced off with
  the environment variable :data:`ENV_VAR` (``GUARDEDTUNING_FLOWER_COMPAT=off``);
- :func:`replace` is the only place that patches a Flower module, and it refuses while the
  gate is off; :func:`prompt_pull_objects` is the one patch that two sides share (the
  ServerApp's HTTP grid and the warm SuperNode).

With the gate off, every patch reports ``"flower (<why>)"`` and leaves Flower as it is, and
the warm SuperNode runs Flower's stock ``flower-supernode``. ``tests/test_compat.py``
resolves every name listed here on the installed Flower, so an upgrade that moves one of
them fails in CI rather than at run time.

Opacus: the one private method we used (``GradSampleModule._close``) has a public name in
Opacus 1.6 (``cleanup``); :func:`close_grad_sample_module` calls whichever exists.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from guardedtuning.errors import GuardedTuningError

ENV_VAR = "GUARDEDTUNING_FLOWER_COMPAT"
"""``off``: use Flower's stock behaviour everywhere; unset or ``auto``: decide by Flower's version."""

SUPPORTED_FLWR = ("1.41.", "1.42.")
"""Flower versions (prefixes) the patches and the warm SuperNode were written against."""

OFF_VALUES = ("off", "stock", "0", "false", "no")
AUTO_VALUES = ("", "auto", "on", "1", "true", "yes")

FLOWER_PRIVATE: dict[str, str] = {
    # replaced in place (see `replace`)
    "vce.add_messages_to_queue": "flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue",
    "http_grid.pull_objects": "flwr.superlink.grid.http_grid:pull_objects",
    "supernode_loop.pull_and_store_message": "flwr.supernode.start_client_internal:_pull_and_store_message",
    "supernode_loop.time": "flwr.supernode.start_client_internal:time",
    "supernode_loop.pull_objects": "flwr.supernode.start_client_internal:pull_objects",
    "inflatable.pull_objects": "flwr.supercore.inflatable.inflatable_utils:pull_objects",
    # the warm SuperNode's object transfers over its link (clients/warm_node.py, `--object-concurrency`)
    "supernode_loop.push_object_contents_from_iterable":
        "flwr.supernode.start_client_internal:push_object_contents_from_iterable",
    "inflatable.get_num_workers": "flwr.supercore.inflatable.inflatable_utils:get_num_workers",
    "inflatable.ObjectUnavailableError": "flwr.supercore.inflatable.inflatable_utils:ObjectUnavailableError",
    # read by the simulation dispatcher (its in-memory store of undelivered messages)
    "linkstate.InMemoryLinkState": "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState",
    # called by the warm SuperNode (clients/warm_node.py): Flower's SuperNode and its ClientApp runner's steps
    "flower_supernode": "flwr.supernode.cli.flower_supernode:flower_supernode",
    "RuntimeTokenHttpInterceptor": "flwr.supercore.interceptors:RuntimeTokenHttpInterceptor",
    "RuntimeVersionHttpInterceptor": "flwr.supercore.interceptors:RuntimeVersionHttpInterceptor",
    "make_simple_http_retry_invoker": "flwr.supercore.retry:make_simple_http_retry_invoker",
    "RuntimeHttpClient": "flwr.supercore.runtime:RuntimeHttpClient",
    "AcquireTaskRequest": "flwr.proto.runtime_pb2:AcquireTaskRequest",
    "TaskType": "flwr.supercore.constant:TaskType",
    "install_from_fab": "flwr.cli.install:install_from_fab",
    "get_load_client_app_fn": "flwr.clientapp.utils:get_load_client_app_fn",
    "get_project_config": "flwr.common.config:get_project_config",
    "get_project_dir": "flwr.common.config:get_project_dir",
    "ErrorCode": "flwr.common.constant:ErrorCode",
    "SubStatus": "flwr.common.constant:SubStatus",
    "Status": "flwr.common.constant:Status",
    "NodeState": "flwr.supernode.nodestate:NodeState",
    "HeartbeatSender": "flwr.supercore.heartbeat:HeartbeatSender",
    "make_task_heartbeat_fn_http": "flwr.supercore.heartbeat:make_task_heartbeat_fn_http",
    "pull_task_input": "flwr.supernode.runtime.run_clientapp:pull_task_input",
    "push_message": "flwr.supernode.runtime.run_clientapp:push_message",
    "push_task_output": "flwr.supernode.runtime.run_clientapp:push_task_output",
    # tests and benchmarks: a ClientApp called in-process needs a task identity; Flower SecAgg+'s encoding;
    # Flower's own object-tree walk (our `get_all_nested_objects` is checked against it)
    "inflatable.get_all_nested_objects": "flwr.supercore.inflatable.inflatable_object:get_all_nested_objects",
    "TaskIdentity": "flwr.supercore.task_identity:TaskIdentity",
    # the in-process runner (inprocess.py) copies each message's content as its protobuf, as a wire would
    "recorddict_to_proto": "flwr.common.serde:recorddict_to_proto",
    "recorddict_from_proto": "flwr.common.serde:recorddict_from_proto",
    "ProtoRecordDict": "flwr.proto.recorddict_pb2:RecordDict",
    "ndarray_to_bytes": "flwr.common:ndarray_to_bytes",
    # tests of the warm SuperNode's loop on a real NodeState (tests/test_warm_node_dead_runs.py)
    "NodeStateFactory": "flwr.supernode.nodestate:NodeStateFactory",
    "ObjectStoreFactory": "flwr.supercore.object_store:ObjectStoreFactory",
    "Run": "flwr.supercore.run:Run",
    "RunStatus": "flwr.supercore.run:RunStatus",
    "RunNotRunningException": "flwr.supercore.run:RunNotRunningException",
    "get_object_tree": "flwr.supercore.inflatable.inflatable_object:get_object_tree",
    "supernode_runtime.acquire_task": "flwr.supernode.servicer.runtime.runtime_handlers:acquire_task",
    "supernode_runtime.pull_task_input": "flwr.supernode.servicer.runtime.runtime_handlers:pull_task_input",
    "supernode_runtime.pull_messages": "flwr.supernode.servicer.runtime.runtime_handlers:pull_messages",
    "supernode_runtime.push_messages": "flwr.supernode.servicer.runtime.runtime_handlers:push_messages",
    "supernode_runtime.push_task_output": "flwr.supernode.servicer.runtime.runtime_handlers:push_task_output",
    "supernode_runtime.PullTaskInputRequest": "flwr.supernode.servicer.runtime.runtime_handlers:PullTaskInputRequest",
    "supernode_runtime.PullAppMessagesRequest": "flwr.supernode.servicer.runtime.runtime_handlers:PullAppMessagesRequest",
    "supernode_runtime.PushAppMessagesRequest": "flwr.supernode.servicer.runtime.runtime_handlers:PushAppMessagesRequest",
    "supernode_runtime.PushTaskOutputRequest": "flwr.supernode.servicer.runtime.runtime_handlers:PushTaskOutputRequest",
    # ... and of its early wake when the receipt's confirmation fails (tests/test_warm_early_wake_confirm.py)
    "supernode_loop.push_messages": "flwr.supernode.start_client_internal:_push_messages",
    "authenticate_task": "flwr.supercore.dependencies.task:authenticate_task",
    "TASK_TOKEN_HEADER": "flwr.supercore.constant:TASK_TOKEN_HEADER",
    "FlowerError": "flwr.supercore.error:FlowerError",
    "Fab": "flwr.supercore.fab:Fab",
    "context_from_proto": "flwr.common.serde:context_from_proto",
    "context_to_proto": "flwr.common.serde:context_to_proto",
    "message_from_proto": "flwr.common.serde:message_from_proto",
    "message_to_proto": "flwr.common.serde:message_to_proto",
}
"""Our name -> ``"module:attribute"`` of every private Flower symbol GuardedTuning uses."""

WARM_NODE_SYMBOLS = (
    "flower_supernode", "supernode_loop.pull_and_store_message", "supernode_loop.time",
    "supernode_loop.pull_objects", "inflatable.pull_objects", "RuntimeTokenHttpInterceptor",
    "RuntimeVersionHttpInterceptor", "make_simple_http_retry_invoker", "RuntimeHttpClient", "AcquireTaskRequest",
    "TaskType", "install_from_fab", "get_load_client_app_fn", "get_project_config", "get_project_dir",
    "ErrorCode", "SubStatus", "Status", "NodeState", "HeartbeatSender", "make_task_heartbeat_fn_http", "pull_task_input",
    "push_message", "push_task_output",
)
"""What the warm SuperNode needs; if one is missing it runs Flower's stock SuperNode instead."""

NODESTATE_METHODS = ("get_tasks", "finish_task", "get_messages_legacy", "delete_messages")
"""Methods of Flower's ``NodeState`` the warm SuperNode calls to discard a dead run's orphaned task
(:func:`guardedtuning.clients.dead_runs.discard_orphan`); one missing also means the stock SuperNode."""

NODESTATE_MESSAGES = "msg_store"
"""Attribute of Flower's ``InMemoryNodeState`` (the SuperNode's only NodeState in flwr 1.41/1.42) holding its
messages (a dict by message id, entries with ``.message``): read to find a reply without marking it retrieved."""

MESSAGE_INS_STORE = "message_ins_store"
"""Attribute of Flower's ``InMemoryLinkState`` holding the messages to deliver (a dict by message id)."""

PULL_CAP_S = 0.1
"""Longest wait between retries of a pending object pull, with :func:`prompt_pull_objects`."""

OBJECT_CONCURRENCY = 16
"""Objects of one message the warm SuperNode pulls or pushes at once over its link.

Flower (1.41/1.42) moves at most ``min(2, CPU cores)`` at once (``get_num_workers``), so a
message of N objects costs ``ceil(N / 2)`` round trips; a split step's messages have 6 to 12
objects (the message, its record dict, each record, each array and its chunks). The
transfers wait on the network, not on a core: at 16, one round trip each way.
"""


class FlowerCompatError(GuardedTuningError):
    """A private Flower symbol is missing, or the compatibility switch has a bad value."""


@dataclass(frozen=True)
class Gate:
    """Whether Flower's internals may be used and patched; ``reason`` says why not."""

    enabled: bool
    flwr_version: str
    reason: str = ""

    @property
    def stock(self) -> str:
        """The status a patch reports when it keeps Flower's behaviour: ``"flower (<reason>)"``."""
        return f"flower ({self.reason})"


def flower_version() -> str:
    """The installed Flower's version, or ``"not installed"``."""
    try:
        return version("flwr")
    except PackageNotFoundError:
        return "not installed"


def gate() -> Gate:
    """The version gate, read now (the environment variable may change between calls).

    Raises
    ------
    FlowerCompatError
        If :data:`ENV_VAR` holds something other than ``off`` or ``auto``.
    """
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower()
    flwr_version = flower_version()
    if value in OFF_VALUES:
        return Gate(False, flwr_version, f"{ENV_VAR}={raw}")
    if value not in AUTO_VALUES:
        raise FlowerCompatError(
            f"{ENV_VAR} is {raw!r}; set it to 'off' (Flower's stock behaviour) or leave it unset "
            f"(patch Flower {', '.join(v + 'x' for v in SUPPORTED_FLWR)} only)")
    if not flwr_version.startswith(SUPPORTED_FLWR):
        return Gate(False, flwr_version, f"not patched for flwr {flwr_version}")
    return Gate(True, flwr_version)


def _split(name: str) -> tuple[str, str]:
    try:
        target = FLOWER_PRIVATE[name]
    except KeyError:
        raise FlowerCompatError(
            f"private Flower symbol {name!r} is not listed in guardedtuning.compat.FLOWER_PRIVATE; "
            "add it there (with its module) before using it") from None
    module, _, attribute = target.partition(":")
    return module, attribute


def owner(name: str) -> Any:
    """The Flower module that holds the symbol listed as ``name`` (imported)."""
    module_name, _ = _split(name)
    try:
        return import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever breaks the import, it is not the Flower we know
        raise FlowerCompatError(
            f"Flower {flower_version()} has no module {module_name} (GuardedTuning's {name!r}: {exc}); "
            f"install flwr {' or '.join(v + 'x' for v in SUPPORTED_FLWR)}, or set {ENV_VAR}=off "
            "to run with Flower's stock behaviour") from exc


def private(name: str) -> Any:
    """The private Flower symbol listed as ``name`` in :data:`FLOWER_PRIVATE`.

    Raises
    ------
    FlowerCompatError
        If the installed Flower lacks it (the message names the symbol, the version and the fix).
    """
    module_name, attribute = _split(name)
    module = owner(name)
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise FlowerCompatError(
            f"Flower {flower_version()} has no {module_name}.{attribute} (GuardedTuning's {name!r}: {exc}); "
            f"install flwr {' or '.join(v + 'x' for v in SUPPORTED_FLWR)}, or set {ENV_VAR}=off "
            "to run with Flower's stock behaviour") from exc


def __getattr__(name: str) -> Any:
    """``from guardedtuning.compat import TaskIdentity``: a listed private symbol whose name is an identifier."""
    if name.isidentifier() and name in FLOWER_PRIVATE:
        return private(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def missing(names: tuple[str, ...] | list[str] | None = None) -> dict[str, str]:
    """Names (all of :data:`FLOWER_PRIVATE` by default) that do not resolve, with the reason."""
    out = {}
    for name in FLOWER_PRIVATE if names is None else names:
        try:
            private(name)
        except FlowerCompatError as exc:
            out[name] = str(exc)
    return out


def replace(name: str, new: Any) -> Any:
    """Set the Flower attribute listed as ``name`` to ``new``; return what it was.

    The only function that changes a Flower module. It refuses while the gate is off, so
    a caller that forgot to check :func:`gate` cannot patch Flower anyway.

    Raises
    ------
    FlowerCompatError
        If the gate is off, or the attribute is missing.
    """
    g = gate()
    if not g.enabled:
        raise FlowerCompatError(f"refusing to patch Flower's {FLOWER_PRIVATE.get(name, name)}: {g.reason}")
    old = private(name)
    setattr(owner(name), _split(name)[1], new)
    return old


def prompt_pull_objects(pull_objects: Any, initial: float, cap: float = PULL_CAP_S,
                        concurrency: int | None = None) -> Any:
    """Flower's ``pull_objects`` retrying after ``initial`` seconds, doubling up to ``cap``.

    Flower's defaults (flwr 1.41/1.42) retry a pending object after 1 s, doubling up to
    10 s, at most 500 times; here the first retry comes after ``initial``, the waits stop
    growing at ``max(initial, cap)``, and the try limit goes (Flower's time limit stays).
    With ``concurrency`` (None: Flower's alone), every object is first tried once,
    ``concurrency`` at a time (one round trip for a message whose objects are all there);
    the objects not there yet (``ObjectUnavailableError``: the sender is still uploading)
    then go through Flower's own ``pull_objects``, its retries as many at once as Flower
    runs them (2), so a pending upload is not polled 16 times as often as by Flower's
    loop (at zero latency, with that storm of retries, a fedlora
    exchange took 2 s longer). Arguments a caller passes explicitly win.
    """

    def pull(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", initial)
        kwargs.setdefault("backoff_cap", max(initial, cap))
        kwargs.setdefault("max_tries_per_object", None)  # Flower's max_time still bounds the wait
        named = {**dict(zip(_PULL_ARGS, args, strict=False)), **{k: kwargs[k] for k in _PULL_ARGS if k in kwargs}}
        if concurrency is None or len(args) > 2 or set(named) != set(_PULL_ARGS) or (
                set(kwargs) - _PULL_TUNING - set(_PULL_ARGS)):
            return pull_objects(*args, **kwargs)
        tuning = {k: v for k, v in kwargs.items() if k not in _PULL_ARGS}
        object_ids, pull_object_fn = list(named["object_ids"]), named["pull_object_fn"]
        got = _try_each_once(object_ids, pull_object_fn, concurrency)
        rest = [o for o in object_ids if o not in got]
        if rest:
            got.update(pull_objects(rest, pull_object_fn, **tuning))
        return got

    pull.guardedtuning_initial = initial  # type: ignore[attr-defined]
    pull.guardedtuning_wrapped = pull_objects  # type: ignore[attr-defined]
    pull.guardedtuning_concurrency = concurrency  # type: ignore[attr-defined]
    return pull


_PULL_ARGS = ("object_ids", "pull_object_fn")  # Flower's pull_objects(object_ids, pull_object_fn, *, ...)
_PULL_TUNING = {"initial_backoff", "backoff_cap", "max_tries_per_object", "max_time", "max_concurrent_pulls"}


def _try_each_once(object_ids: list[str], pull_object_fn: Any, concurrency: int) -> dict[str, bytes]:
    """One attempt at each object, ``concurrency`` at a time; the ones not available yet are left out.

    Any other error is Flower's pull failing (raised, as Flower's ``pull_objects`` raises it).
    """
    unavailable = private("inflatable.ObjectUnavailableError")

    def once(object_id: str) -> tuple[str, bytes | None]:
        try:
            return object_id, pull_object_fn(object_id)
        except unavailable:
            return object_id, None

    if not object_ids:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(object_ids)))) as pool:
        return {o: content for o, content in pool.map(once, object_ids) if content is not None}


def concurrent_push_objects(push_contents: Any, concurrency: int) -> Any:
    """Flower's ``push_object_contents_from_iterable`` pushing ``concurrency`` objects at once.

    Flower pushes at most ``min(2, CPU cores)`` at once; an explicit ``max_concurrent_pushes``
    still wins. Beyond the core count only with :func:`uncapped_num_workers` installed.
    """

    def push(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("max_concurrent_pushes", concurrency)
        return push_contents(*args, **kwargs)

    push.guardedtuning_wrapped = push_contents  # type: ignore[attr-defined]
    push.guardedtuning_concurrency = concurrency  # type: ignore[attr-defined]
    return push


def uncapped_num_workers(max_concurrent: int) -> int:
    """Flower's ``get_num_workers`` without its cap at the CPU-core count.

    Flower sizes its object pull/push thread pools ``min(max_concurrent, cores)``; those
    threads wait on the network (one request each), not on a core, so on a 2-core node a
    cap of 2 costs ``ceil(N / 2)`` round trips for N objects. Calls that pass Flower's
    default (2) get 2, as before (on 2 or more cores).
    """
    return max(1, int(max_concurrent))


def install_prompt_pulls(name: str, initial: float) -> str:
    """Replace the ``pull_objects`` listed as ``name`` by :func:`prompt_pull_objects`; return the status.

    Installing twice wraps Flower's own function once (the newer ``initial`` wins).
    """
    g = gate()
    if not g.enabled:
        return g.stock
    try:
        current = private(name)
    except FlowerCompatError:
        return f"flower ({FLOWER_PRIVATE[name].replace(':', '.')} not found)"
    replace(name, prompt_pull_objects(getattr(current, "guardedtuning_wrapped", current), initial))
    return f"retries after {initial * 1000:g} ms, doubling up to {max(initial, PULL_CAP_S) * 1000:g} ms"


def get_all_nested_objects(obj: Any) -> dict[str, Any]:
    """Every object in a Flower message's object tree, children before parents, by object id.

    The same walk as Flower's private ``flwr.supercore.inflatable.inflatable_object.
    get_all_nested_objects``, through the public ``children`` and ``object_id`` of
    Flower's objects (``Message``, records, arrays), so it works with the gate off too.
    """
    out: dict[str, Any] = {}
    for child in (obj.children or {}).values():
        out.update(get_all_nested_objects(child))
    out[obj.object_id] = obj
    return out


def close_grad_sample_module(gsm: Any) -> None:
    """Remove an Opacus ``GradSampleModule``'s hooks and attributes (the wrapped module is plain again).

    Opacus 1.6 calls this ``cleanup()``; Opacus 1.5 only has the private ``_close()``.
    """
    cleanup = getattr(gsm, "cleanup", None)
    if callable(cleanup):
        cleanup()
    else:
        gsm._close()
