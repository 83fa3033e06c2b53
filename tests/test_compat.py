"""guardedtuning.compat: every private Flower/Opacus symbol, one version gate, stock fallback.

The first tests resolve every private symbol on the installed Flower (an upgrade that
moves one fails here, not at run time); the others force the gate off
(``GUARDEDTUNING_FLOWER_COMPAT=off``) and check that nothing of Flower's is patched and
that the warm SuperNode becomes Flower's stock ``flower-supernode``.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from guardedtuning import compat
from guardedtuning.clients import warm_node
from guardedtuning.server_app import dispatch, object_pulls

LOOP_PATCHES = ("supernode_loop.pull_and_store_message", "supernode_loop.time", "supernode_loop.pull_objects")


@pytest.fixture(autouse=True)
def _gate_unset(monkeypatch):
    monkeypatch.delenv(compat.ENV_VAR, raising=False)


@pytest.fixture
def flower_attrs(monkeypatch):
    """Every Flower attribute a patch may replace, restored after the test; returns their originals."""
    names = [*LOOP_PATCHES, dispatch.ENGINE_DISPATCHER, object_pulls.HTTP_GRID_PULLS, "inflatable.pull_objects"]
    originals = {}
    for name in names:
        module, attribute = compat.owner(name), compat.FLOWER_PRIVATE[name].split(":")[1]
        originals[name] = getattr(module, attribute)
        monkeypatch.setattr(module, attribute, originals[name])
    return originals


# ---------------------------------------------------------------------------------------
# (a) the installed Flower has everything we use


def test_installed_flower_is_supported_and_has_every_listed_private_symbol():
    g = compat.gate()
    assert g.enabled, f"flwr {g.flwr_version} is not in {compat.SUPPORTED_FLWR}: {g.reason}"
    assert compat.missing() == {}
    assert set(compat.WARM_NODE_SYMBOLS) <= set(compat.FLOWER_PRIVATE)


def test_the_patched_functions_still_have_the_shape_the_patches_assume():
    for name in ("http_grid.pull_objects", "supernode_loop.pull_objects", "inflatable.pull_objects"):
        params = inspect.signature(compat.private(name)).parameters
        assert {"initial_backoff", "backoff_cap", "max_tries_per_object", "max_time"} <= set(params), name
    dispatcher = inspect.signature(compat.private(dispatch.ENGINE_DISPATCHER)).parameters
    assert list(dispatcher) == ["state", "queue", "nodes_mapping", "f_stop"]
    assert compat.private("supernode_loop.time") is time  # the SuperNode loop sleeps through this module
    init = inspect.getsource(compat.private("linkstate.InMemoryLinkState").__init__)
    assert f"self.{compat.MESSAGE_INS_STORE}" in init  # the dispatcher's glance at undelivered messages
    task_identity = compat.private("TaskIdentity")
    # settable identity (tests set it to call a ClientApp in-process)
    assert all(isinstance(getattr(type(task_identity), a), property) for a in ("task_id", "run_id", "node_id"))


def test_opacus_grad_sample_module_can_be_closed():
    import torch
    from opacus import GradSampleModule

    lin = torch.nn.Linear(3, 2)
    gsm = GradSampleModule(lin, batch_first=True)
    gsm(torch.randn(4, 3, requires_grad=True)).sum().backward()  # inputs with grads: no hook warning
    assert lin.weight.grad_sample.shape == (4, 2, 3)
    compat.close_grad_sample_module(gsm)
    lin.weight.grad = None
    lin(torch.randn(4, 3)).sum().backward()  # hooks gone: no per-sample gradient any more
    assert getattr(lin.weight, "grad_sample", None) is None


def test_nested_objects_walk_equals_flowers_own():
    flowers = compat.private("inflatable.get_all_nested_objects")
    task_identity = compat.private("TaskIdentity")  # a Message needs the run it belongs to
    task_identity.task_id, task_identity.run_id, task_identity.node_id = 1, 1, 1
    msg = Message(RecordDict({"a": ArrayRecord({"x": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
                                                "y": Array(np.ones(4, dtype=np.int64))}),
                              "m": MetricRecord({"loss": 0.5})}), dst_node_id=3, message_type="train")
    ours = compat.get_all_nested_objects(msg)
    assert list(ours) == list(flowers(msg))  # same objects, same (post-)order
    assert list(ours)[-1] == msg.object_id and len(ours) >= 5


# ---------------------------------------------------------------------------------------
# the gate and its errors


@pytest.mark.parametrize("value", ["off", "OFF", " stock ", "0"])
def test_env_var_forces_the_gate_off(monkeypatch, value):
    monkeypatch.setenv(compat.ENV_VAR, value)
    g = compat.gate()
    assert not g.enabled and g.stock == f"flower ({compat.ENV_VAR}={value})"


@pytest.mark.parametrize("value", ["", "auto", "on"])
def test_env_var_auto_decides_by_version(monkeypatch, value):
    monkeypatch.setenv(compat.ENV_VAR, value)
    assert compat.gate().enabled
    monkeypatch.setattr(compat, "flower_version", lambda: "1.43.0")
    assert compat.gate() == compat.Gate(False, "1.43.0", "not patched for flwr 1.43.0")


def test_a_bad_env_value_names_the_variable_the_value_and_the_fix(monkeypatch):
    monkeypatch.setenv(compat.ENV_VAR, "of")
    with pytest.raises(compat.FlowerCompatError, match=rf"{compat.ENV_VAR} is 'of'; set it to 'off'"):
        compat.gate()


def test_missing_symbols_are_reported_with_the_fix(monkeypatch):
    monkeypatch.setitem(compat.FLOWER_PRIVATE, "push_message", "flwr.supernode.runtime.run_clientapp:gone")
    monkeypatch.setitem(compat.FLOWER_PRIVATE, "TaskType", "flwr.no_such_module:TaskType")
    gone = compat.missing()
    assert set(gone) == {"push_message", "TaskType"}
    assert "flwr.supernode.runtime.run_clientapp.gone" in gone["push_message"]
    assert f"{compat.ENV_VAR}=off" in gone["TaskType"] and "flwr.no_such_module" in gone["TaskType"]
    with pytest.raises(compat.FlowerCompatError, match="not listed"):
        compat.private("something_else")
    with pytest.raises(AttributeError):
        compat.something_else  # noqa: B018


def test_replace_refuses_with_the_gate_off(monkeypatch, flower_attrs):
    monkeypatch.setenv(compat.ENV_VAR, "off")
    with pytest.raises(compat.FlowerCompatError, match="refusing to patch"):
        compat.replace(dispatch.ENGINE_DISPATCHER, lambda *a: None)
    assert compat.private(dispatch.ENGINE_DISPATCHER) is flower_attrs[dispatch.ENGINE_DISPATCHER]


# ---------------------------------------------------------------------------------------
# object pulls


def test_prompt_pulls_set_flowers_backoff_and_leave_explicit_arguments():
    calls = []
    pull = compat.prompt_pull_objects(lambda *a, **k: calls.append((a, k)) or {}, 0.002)
    pull(["id"], "fn")
    pull(["id"], "fn", backoff_cap=5.0)
    assert calls[0] == ((["id"], "fn"), {"initial_backoff": 0.002, "backoff_cap": compat.PULL_CAP_S,
                                         "max_tries_per_object": None})
    assert calls[1][1]["backoff_cap"] == 5.0
    assert compat.prompt_pull_objects(lambda: None, 0.5).guardedtuning_initial == 0.5


def test_object_pulls_wrap_flowers_function_once(flower_attrs):
    original = flower_attrs[object_pulls.HTTP_GRID_PULLS]
    assert object_pulls.install(0.002) == "retries after 2 ms, doubling up to 100 ms"
    assert object_pulls.install(0.004).startswith("retries after 4 ms")
    current = compat.private(object_pulls.HTTP_GRID_PULLS)
    assert current.guardedtuning_wrapped is original and current.guardedtuning_initial == 0.004


# ---------------------------------------------------------------------------------------
# (b) gate off: stock Flower everywhere


def test_gate_off_patches_nothing(monkeypatch, flower_attrs):
    monkeypatch.setenv(compat.ENV_VAR, "off")
    stock = f"flower ({compat.ENV_VAR}=off)"
    assert dispatch.install(0.002) == stock
    assert object_pulls.install(0.002) == stock
    assert compat.install_prompt_pulls("inflatable.pull_objects", 0.002) == stock
    backoff = warm_node.Backoff(start=0.005, limit=3.0)
    assert warm_node.patch_supernode_polling(backoff, reply_poll=0.002) == stock
    for name, original in flower_attrs.items():
        assert compat.private(name) is original, name


def test_gate_on_patches_the_supernode_loop(flower_attrs):
    backoff = warm_node.Backoff(start=0.005, limit=3.0)
    assert warm_node.patch_supernode_polling(backoff, reply_poll=0.002).startswith("fast (polls from 5 ms")
    assert all(compat.private(n) is not flower_attrs[n] for n in LOOP_PATCHES)
    assert compat.private("supernode_loop.pull_objects").guardedtuning_wrapped is \
        flower_attrs["supernode_loop.pull_objects"]
    assert warm_node.patch_supernode_polling(backoff, reply_poll=0.002) == "fast (already installed)"


def test_stock_command_drops_only_the_warm_nodes_own_options():
    argv = ["--superlink", "127.0.0.1:9092", "--poll-min", "0.01", "--insecure", "--reply-poll=0.001",
            "--node-config", "partition-id=0 num-partitions=2", "--isolation", "process", "--port", "9111"]
    cmd = warm_node.stock_supernode_command(argv)
    assert os.path.basename(cmd[0]) == "flower-supernode"
    assert cmd[1:] == ["--superlink", "127.0.0.1:9092", "--insecure", "--node-config",
                       "partition-id=0 num-partitions=2", "--port", "9111"]
    assert warm_node.stock_supernode_command(["--isolation", "subprocess"])[1:] == ["--isolation", "subprocess"]


def _run_supernode_main(monkeypatch, argv):
    execs: list[list[str]] = []
    monkeypatch.setattr(warm_node, "_exec", execs.append)
    monkeypatch.setattr(warm_node, "_Runner", lambda *a, **k: pytest.fail("the warm runner was started"))
    assert warm_node.supernode_main(argv) == 0
    return execs


def test_gate_off_warm_supernode_execs_stock_flower(monkeypatch, flower_attrs):
    monkeypatch.setenv(compat.ENV_VAR, "off")
    execs = _run_supernode_main(monkeypatch, ["--superlink", "127.0.0.1:9092", "--insecure", "--poll-min", "0.01"])
    assert len(execs) == 1 and os.path.basename(execs[0][0]) == "flower-supernode"
    assert execs[0][1:] == ["--superlink", "127.0.0.1:9092", "--insecure"]
    for name, original in flower_attrs.items():
        assert compat.private(name) is original, name


def test_a_missing_symbol_also_chooses_the_stock_supernode(monkeypatch, flower_attrs):
    monkeypatch.setitem(compat.FLOWER_PRIVATE, "pull_task_input", "flwr.supernode.runtime.run_clientapp:gone")
    assert "pull_task_input" in warm_node.stock_reason()
    execs = _run_supernode_main(monkeypatch, ["--insecure"])
    assert [os.path.basename(c[0]) for c in execs] == ["flower-supernode"]
    assert compat.private("supernode_loop.time") is time


def test_runner_that_keeps_failing_to_start_stops_the_supernode():
    gave_up = threading.Event()
    r, w = os.pipe()
    try:
        runner = warm_node._Runner([sys.executable, "-c", "raise SystemExit(3)"], r, give_up=gave_up.set,
                                   settle_s=0.05)
        assert gave_up.wait(timeout=60)
        assert runner.starts == warm_node.RUNNER_MAX_QUICK_EXITS
        time.sleep(0.3)
        assert runner.starts == warm_node.RUNNER_MAX_QUICK_EXITS  # no restart after giving up
        runner.stop()
    finally:
        os.close(r)
        os.close(w)


def test_no_module_but_compat_reaches_flower_internals():
    """Private Flower modules are imported (or patched) only in guardedtuning/compat.py."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    private_flower = re.compile(
        r"^\s*(from|import)\s+flwr\.(server|superlink|supernode|supercore|common|proto|cli|clientapp\.utils|simulation)\b"
        r"|import_module\(\s*['\"]flwr\.|\._close\(\)", re.M)
    offenders = []
    for path in [*repo.glob("guardedtuning/**/*.py"), *repo.glob("tests/*.py"), *repo.glob("simulations/*.py")]:
        if path.name == "compat.py" or path == Path(__file__).resolve():
            continue
        for m in private_flower.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(repo)}: {m.group(0).strip()}")
    assert offenders == [], "reach these through guardedtuning.compat:\n" + "\n".join(offenders)
