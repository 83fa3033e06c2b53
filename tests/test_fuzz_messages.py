"""Issue 12, Fuzzing: no malformed message crashes a handler or stops a run.

Hypothesis (derandomized: the same examples on every run, no example database, no
shrinking) generates malformed messages from valid ones: records missing, extra or of
another record type; config keys missing, extra or of another type (float, str, bytes,
bool, list); arrays of another dtype, shape or rank, empty, scalar, holding
NaN/inf/1e300/3e38, or with an undecodable payload; replays of an earlier message; stale
and future rounds and steps; ``steps`` and ``resumed-after`` other than the plan's.

Client side (:func:`test_fuzz_client_handler`): every message type the ClientApp registers
(``recipes.message_handlers``: ``train``, ``train.split``, ``train.gradfree``,
``train.offsite``) gets malformed messages in short sequences to one client (a fresh
``Context`` per example): 0-2 valid messages, two malformed ones, and maybe the valid next
one. Each message must be answered with a well-formed reply (every array in it finite)
or refused with a ``MessageError`` naming what is wrong, which Flower's runtime turns into
the client's error reply. Any other exception (a ``KeyError``, a torch shape error, an
overflow in a seed) is a crash, and so is a reply with NaN/inf in it. The handlers are the
real ones, on tiny models (T <= 8), called directly (no Ray), as tests/test_noise_replay.py
does. A full handler trains a model for every accepted message, too slow for 1,000 on a
shared 2-core machine, so each message type is fuzzed twice:

- ``decoding``: :data:`PER_TYPE` (1,000) malformed messages to the real handler with its
  compute (forward, backward, local steps) replaced by a canned result
  (:func:`_without_compute`): the unpacking and checks of the message, the privacy
  state's sequence checks and budget, loading the adapter, and packing the reply run;
- ``full-handler``: :data:`FULL_HANDLER` (40) malformed messages to the unchanged handler.

Server side (:func:`test_fuzz_server_round`): for each design (split, gradfree, fedlora,
offsite) the real ``Design.train``, the privacy merge and the strategy's aggregation, chained
as :func:`~guardedtuning.server_app.engine.run_rounds` chains them (less evaluation and the
checkpoint), run :data:`SERVER_EXAMPLES` rounds on a :class:`FuzzGrid` with two clients
whose replies are synthesized: an honest one, and one that answers one exchange of the
round (split's activations, gradfree's release, or the final update reply with its
metrics and privacy records) with a malformed reply, an error, no reply, junk or a spent
budget with a malformed epsilon. The round must end without an exception (the honest client
is always there, so no run may stop); every drop is logged with its reason, never the
honest client's; the global state stays finite; and when the bad client was dropped, the
new global state is exactly the old one plus the honest client's update. A round costs a
real exchange, top step and aggregation, so this path gets 80 rounds per design; the
checks it goes through get 1,000 and more malformed replies each on their own:
tests/test_bad_clients.py fuzzes ``unpack_acts``, ``unpack_release`` and
``AdapterFedAvg.aggregate_train`` with 1,200 each. There are no evaluation replies: utility
is measured centrally (``configure_evaluate`` sends nothing).

Noise and Poisson rows use ``privacy.noise-seed = 0`` (reproducible), so that an
example's client answers with the same shapes when it is replayed.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from guardedtuning.compat import TaskIdentity
from guardedtuning.errors import MessageError
from guardedtuning.recipes import build_config, message_handlers
from guardedtuning.wire import gradfree as gf_wire
from guardedtuning.wire import split as split_wire
from guardedtuning.wire.records import tensors_to_record

PER_TYPE = 1_000  # malformed messages per message type (to the decoding and checks)
FULL_HANDLER = 40  # malformed messages per message type to the full handler (compute included)
SPECIAL = (math.nan, math.inf, -math.inf, 1e300, -1e300, 3.4e38, -3.4e38, 1e30, 1e6, 0.0, -0.0, 5e-324)
DTYPES = (np.float64, np.float32, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_, np.complex64)
NAMES = ("h", "mask", "labels", "z", "codes", "scales", "meta", "arrays", "config", "grad", "out", "acts",
         "update", "metrics", "privacy", "emulator", "x")
CONFIG_KEYS = ("server-round", "step", "steps", "resumed-after", "stage", "digest", "local-steps", "x")
INT_EDGES = (0, -1, 1, 2, 3, 2**31, 2**62, -(2**63), 2**63 - 1)

# no shrinking: a failure reports the message that crashed (describe()), and the time stays predictable
FUZZ = settings(derandomize=True, database=None, deadline=None, phases=(Phase.explicit, Phase.generate),
                report_multiple_bugs=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True)
def _task_identity(tmp_path, monkeypatch):
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1  # as tests.local_grid does
    monkeypatch.setenv("GUARDEDTUNING_CACHE", str(tmp_path / "cache"))  # where offsite clients keep the emulator


def _sent(msg: Message) -> Message:
    """A message as the grid pushes it (with a message id, which a reply refers to)."""
    msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return msg


# ------------------------------------------------------------------ malformations


class Choices:
    """The choices of one example, taken from a fixed list of integers hypothesis draws up front.

    The client's answers steer what comes next (the valid next message depends on the
    shapes it released), so drawing from hypothesis as the example goes would make the
    draws depend on state hypothesis does not control; one fixed draw per example keeps its
    replays and shrinking exact (shrinking moves every choice towards the first option).
    """

    def __init__(self, values: list[int]) -> None:
        self.values, self.i = values, 0

    def __repr__(self) -> str:
        used = self.values[: max(self.i, 1)]
        return f"Choices({used})"

    def int(self, lo: int, hi: int) -> int:
        v = self.values[self.i % len(self.values)] if self.i < len(self.values) else 0
        self.i += 1
        return lo + v % (hi - lo + 1)

    def pick(self, options: Any) -> Any:
        options = list(options)
        i = self.int(0, 2**16)
        return options[i % len(options)] if options else None

    def bool(self) -> bool:
        return bool(self.int(0, 1))


CHOICES = st.lists(st.integers(0, 2**16 - 1), min_size=200, max_size=200).map(Choices)


def bad_array(c: Choices, arr: np.ndarray) -> Array:
    """``arr`` with one thing wrong: dtype, shape, rank, emptiness, special values, or its payload."""
    how = c.pick(("special", "dtype", "shape", "rank", "empty", "special", "huge", "corrupt", "scalar", "big-int"))
    a = np.array(arr, copy=True)
    with np.errstate(all="ignore"):
        if how == "dtype":
            a = a.astype(c.pick(DTYPES))
        elif how == "shape" and a.ndim:
            axis = c.pick(range(a.ndim))
            shape = list(a.shape)
            d = shape[axis]
            shape[axis] = c.pick((max(d - 1, 0), 0, d + 1, 2 * d + 3, 1))
            a = np.resize(a, shape)
        elif how == "rank":
            a = a[..., None] if c.bool() or a.ndim < 2 else a.reshape(-1)
        elif how == "empty":
            a = np.zeros((0, *a.shape[1:]) if a.ndim else (0,), dtype=a.dtype)
        elif how == "special":
            a = a.astype(c.pick((np.float64, np.float32, np.float16)))
            value = c.pick(SPECIAL)
            if c.bool():
                a[...] = value
            elif a.size:
                a.reshape(-1)[c.pick(range(a.size))] = value
        elif how == "huge":
            a = np.full(a.shape, c.pick((1e300, -1e300, 1e39, 3e38)), dtype=np.float64)
        elif how == "corrupt":
            payload = bytes(c.int(0, 255) for _ in range(c.int(0, 24)))
            return Array(dtype=str(a.dtype), shape=tuple(int(s) for s in a.shape),
                         stype=c.pick(("numpy.ndarray", "torch.Tensor", "")), data=payload)
        elif how == "scalar":
            a = np.asarray(c.pick((*SPECIAL, 1.0)), dtype=np.float32)
        elif how == "big-int":
            a = np.full(a.shape, c.pick((2**62, -(2**62), 255, -1)), dtype=np.int64)
    return Array(np.ascontiguousarray(a))


def junk_array(c: Choices) -> Array:
    shape = tuple(c.int(0, 4) for _ in range(c.int(0, 3)))
    return bad_array(c, np.ones(shape, np.float32))


TEXTS = ("", "x", "release", "train", "0", "1e300", "nan", "../../etc/passwd", "é" * 3)
FLOATS = (*SPECIAL, 1.5, -2.0, 0.5)


def bad_value(c: Choices, value: Any = None) -> Any:
    """A config value of another type or out of range (``value``: the one it replaces)."""
    how = c.pick(("int", "float", "text", "bool", "bytes", "list", "near"))
    if how == "near" and isinstance(value, int) and not isinstance(value, bool):
        return c.pick((value - 1, value + 1, value + 2, -value, value * 1000, float(value)))
    if how == "near" and isinstance(value, str):
        return c.pick((value + "x", value.upper(), ""))
    if how == "int":
        return c.pick(INT_EDGES)
    if how == "float":
        return c.pick(FLOATS)
    if how == "text":
        return c.pick(TEXTS)
    if how == "bool":
        return c.bool()
    if how == "bytes":
        return bytes(c.int(0, 255) for _ in range(c.int(0, 6)))
    return [c.int(-3, 3) for _ in range(c.int(1, 3))]


def bad_config(c: Choices, conf: ConfigRecord) -> ConfigRecord:
    out = dict(conf.items())
    for _ in range(c.int(1, 2)):
        how = c.pick(("retype", "drop", "extra", "retype"))
        if how == "drop" and out:
            del out[c.pick(sorted(out))]
        elif how == "extra" or not out:
            out[c.pick(CONFIG_KEYS)] = bad_value(c)
        else:
            key = c.pick(sorted(out))
            out[key] = bad_value(c, out[key])
    return ConfigRecord(out)


METRIC_KEYS = ("num-examples", "train_loss", "compute_s", "t_start", "t_end", "peak_mem_mb", "state_bytes",
               "gpu_peak_mem_mb", "budget-spent", "epsilon", "x")


def bad_metrics(c: Choices, rec: MetricRecord) -> MetricRecord:
    out = dict(rec.items())
    for _ in range(c.int(1, 3)):
        if c.pick(("set", "drop", "set")) == "drop" and out:
            del out[c.pick(sorted(out))]
        else:
            out[c.pick(METRIC_KEYS)] = c.pick((c.pick((*FLOATS, -1.0, 1e12)), c.pick(INT_EDGES),
                                               [c.pick(FLOATS) for _ in range(c.int(1, 2))]))
    return MetricRecord(out)


def bad_array_record(c: Choices, rec: ArrayRecord) -> ArrayRecord:
    out = {k: rec[k] for k in rec.keys()}
    for _ in range(c.int(1, 2)):
        how = c.pick(("array", "drop", "extra", "rename", "array", "array"))
        if how == "drop" and out:
            del out[c.pick(sorted(out))]
        elif how == "rename" and out:
            key = c.pick(sorted(out))
            out[key + ".x"] = out.pop(key)
        elif how == "array" and out:
            key = c.pick(sorted(out))
            try:
                out[key] = bad_array(c, out[key].numpy())
            except (ValueError, TypeError, EOFError):  # already undecodable: replace it
                out[key] = junk_array(c)
        else:
            out[c.pick(NAMES)] = junk_array(c)
    return ArrayRecord(out)


def junk_record(c: Choices) -> Any:
    kind = c.pick(("array", "config", "metric"))
    if kind == "array":
        return ArrayRecord({c.pick(NAMES): junk_array(c)})
    if kind == "config":
        return ConfigRecord({c.pick(CONFIG_KEYS): bad_value(c)})
    return MetricRecord({c.pick(METRIC_KEYS): c.pick(FLOATS)})


def bad_content(c: Choices, content: RecordDict) -> RecordDict:
    """``content`` with one or two things wrong: a record missing, extra, of another type, or malformed."""
    out = dict(content.items())
    for _ in range(c.int(1, 2)):
        how = c.pick(("inner", "drop", "extra", "swap", "inner", "inner"))
        key = c.pick(sorted(out))
        if how == "drop" and key is not None:
            del out[key]
        elif how == "swap" and key is not None:
            out[key] = junk_record(c)
        elif how == "inner" and key is not None:
            rec = out[key]
            if isinstance(rec, ArrayRecord):
                out[key] = bad_array_record(c, rec)
            elif isinstance(rec, ConfigRecord):
                out[key] = bad_config(c, rec)
            else:
                out[key] = bad_metrics(c, rec)
        else:
            out[c.pick(NAMES)] = junk_record(c)
    return RecordDict(out)


def junk_content(c: Choices) -> RecordDict:
    return RecordDict({c.pick(NAMES): junk_record(c) for _ in range(c.int(0, 3))})


def describe(content: RecordDict) -> str:
    """What a message holds, for a failure's report: records, config values, array dtypes and shapes."""
    parts = []
    for key, rec in content.items():
        if isinstance(rec, ArrayRecord):
            parts.append(f"{key}: ArrayRecord{{" + ", ".join(
                f"{n}: {rec[n].dtype}{list(rec[n].shape)}" for n in rec.keys()) + "}")
        else:
            parts.append(f"{key}: {type(rec).__name__}{dict(rec.items())}")
    return "; ".join(parts) or "(empty)"


def finite_reply(reply: Message, where: str, msg: Message) -> None:
    """A client's reply must be a reply (not an error), and every float array in it finite."""
    assert isinstance(reply, Message) and not reply.has_error(), f"{where}: not a reply: {reply}"
    for key, rec in reply.content.items():
        if isinstance(rec, ArrayRecord):
            for name in rec.keys():
                arr = rec[name].numpy()
                assert arr.dtype.kind not in "fc" or np.isfinite(arr).all(), \
                    f"{where}: the client sent non-finite {key}/{name}\n  message: {describe(msg.content)}"


# ------------------------------------------------------------------ the designs under test


BASE = {"model.max-length": 8, "data.train-size": 48, "data.test-size": 8, "train.batch-size": 2,
        "train.local-steps": 2, "federation.num-clients": 3, "federation.clients-per-round": 3,
        "aggregation.secure": False, "comm.timeout": 0.01, "comm.poll-interval": 0.001,
        # reproducible noise and Poisson rows (the opt-in that voids the guarantee): a failing example can be
        # replayed with the same shapes; the checks under test do not depend on where the noise comes from
        "privacy.noise-seed": 0}
RECIPES = {
    # split with every client-side knob that changes what a step does: d_chi noise (so messages are ordered)
    # and DP-SGD (Poisson rows, per-example clipping in the backward)
    "split": {"recipe": "split", "privacy.mechanism": "dchi", "privacy.eta": 100.0, "dp.enabled": True,
              "dp.target-epsilon": 1e6},
    "fedlora": {"recipe": "fedlora", "train.local-steps": 1},
    # d_chi rather than the recipe's PrivTune, whose calibration costs seconds per release on a CPU
    "gradfree": {"recipe": "gradfree", "gradfree.adapter-dim": 8, "train.local-steps": 1,
                 "privacy.mechanism": "dchi", "privacy.eta": 100.0},
    "offsite": {"recipe": "offsite", "offsite.emulator-layers": 1, "offsite.reference": False,
                "train.local-steps": 1},
}
MESSAGE_TYPES = {"train.split": "split", "train": "fedlora", "train.gradfree": "gradfree",
                 "train.offsite": "offsite"}


@dataclass
class Kit:
    """A recipe's config and its server side (the design), which builds the valid messages."""

    flat: dict[str, Any]
    run: Any
    design: Any
    arrays: ArrayRecord | None = None  # the global state as the first message carries it


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> dict[str, Kit]:
    from guardedtuning.recipes import get
    from guardedtuning.results import Recorder
    from guardedtuning.server_app.common import ServerRun

    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost on a shared machine
    out: dict[str, Kit] = {}
    root = tmp_path_factory.mktemp("fuzz")
    for name, extra in RECIPES.items():
        flat = {**get(extra["recipe"]).overrides, **BASE, **extra, "output.dir": str(root / name)}
        cfg = build_config(flat)
        rec = Recorder(cfg, root / name, model=cfg.model.name, dataset=cfg.data.name, recipe=get(cfg.recipe))
        run = ServerRun.create(cfg, rec)
        design_cls = {"split": "guardedtuning.server_app.split_driver:SplitDesign",
                      "fedlora": "guardedtuning.server_app.fedlora_driver:FedLoraDesign",
                      "gradfree": "guardedtuning.server_app.gradfree_driver:GradfreeDesign",
                      "offsite": "guardedtuning.server_app.offsite_driver:OffsiteDesign"}[name]
        module, _, attr = design_cls.partition(":")
        out[name] = Kit(flat, run, getattr(__import__(module, fromlist=[attr]), attr)(run))
    yield out
    torch.set_num_threads(threads)


def _context(flat: dict[str, Any], node: int = 1000) -> Context:
    return Context(run_id=1, node_id=node, node_config={"partition-id": 0, "num-partitions": 3},
                   state=RecordDict(), run_config=dict(flat))


def first_message(kit: Kit, round_: int, node: int = 1000, *, package: bool = True) -> Message:
    """The round's first message as the engine sends it: the strategy's, with the design's config.

    Offsite's carries the emulator in round 1 only (the server sends it to a node once),
    and only with ``package`` (tiny-bert's emulator is 68 MB of float32: hashing it costs).
    """
    design = kit.design
    config = {**design.round_config(_RoundStub(round_)), "server-round": round_}
    if kit.arrays is None:  # the client fuzz never changes the global state: pack it once
        kit.arrays = tensors_to_record(design.global_state())
    content = RecordDict({"arrays": kit.arrays, "config": ConfigRecord(config)})
    msg = Message(content, dst_node_id=node, message_type=design.message_type)
    return design.outgoing(_RoundStub(round_), [msg])[0] if round_ == 1 and package else msg


@dataclass
class _RoundStub:
    number: int
    resumed_after: int = 0


class Protocol:
    """The valid message sequence of one message type to one client, tracked from its replies."""

    def __init__(self, kit: Kit) -> None:
        self.kit = kit
        self.mtype = kit.design.message_type
        self.gen = torch.Generator().manual_seed(0)
        self.package = True  # offsite: whether round 1's message carries the emulator
        self.reset()

    def reset(self, where: tuple[int, int, tuple[int, ...], Any] = (1, 0, (0, 0, 0), None)) -> None:
        self.round_, self.stage, self.shape, self.mask = where  # mask: the client's last released (B, T) mask

    @property
    def where(self) -> tuple[int, int, tuple[int, ...], Any]:
        return self.round_, self.stage, self.shape, self.mask

    def next(self) -> Message:
        return first_message(self.kit, self.round_, package=self.package)

    def answered(self, reply: Message) -> None:
        self.round_ += 1

    def refused(self) -> None:
        """After a refusal the client's state is not known here: go on with a later round's first message."""
        self.round_, self.stage = self.round_ + 1, 0

    def shifted(self, c: Choices) -> Message:
        """The valid next message with its round, step, ``steps`` or ``resumed-after`` moved."""
        msg = self.next()
        conf = dict(msg.content["config"].items())
        key = c.pick(sorted(k for k in conf if isinstance(conf[k], int) and not isinstance(conf[k], bool)))
        conf[key] = conf[key] + c.pick((-1, 1, -2, 2, -3, 10**6, -(10**6)))
        content = dict(msg.content.items())
        content["config"] = ConfigRecord(conf)
        return Message(RecordDict(content), dst_node_id=1000, message_type=self.mtype)

    def released(self, reply: Message) -> tuple[int, ...]:
        """(rows, T, width) of the activations a reply released (h may be trimmed to the real tokens' rows)."""
        acts = reply.content["acts"]
        if "h" in acts:
            return (*acts["mask"].shape, acts["h"].shape[-1])
        return (*acts["mask"].shape, int(acts["meta"].numpy()[1]))


class SplitProtocol(Protocol):
    def next(self) -> Message:
        if self.stage == 0:
            return first_message(self.kit, self.round_)
        grad = 1e-3 * torch.randn(self.shape, generator=self.gen)
        # every way a gradient is sent: float32, 8 or 4 bits (split.grad-bits), dense or trimmed to the real tokens
        bits, mask = (0, 8, 4)[self.round_ % 3], self.mask if self.round_ % 2 else None
        return split_wire.step_message(1000, self.round_, self.stage, self.kit.design.steps, grad, 0, mask=mask,
                                       bits=bits)

    def answered(self, reply: Message) -> None:
        if "acts" in reply.content:
            self.shape, self.stage = self.released(reply), self.stage + 1
            self.mask = torch.from_numpy(reply.content["acts"]["mask"].numpy().copy())
        else:  # the update (or a spent budget): the round is over
            self.round_, self.stage = self.round_ + 1, 0


class GradfreeProtocol(Protocol):
    def next(self) -> Message:
        if self.stage == 0:
            return first_message(self.kit, self.round_)
        z = 0.1 * torch.randn(self.shape, generator=self.gen)
        return gf_wire.train_message(1000, self.round_, z, 0)

    def answered(self, reply: Message) -> None:
        if "acts" in reply.content:
            n, t, _ = self.released(reply)
            self.shape, self.stage = (n, t, self.kit.design.hidden), 1
        else:
            self.round_, self.stage = self.round_ + 1, 0


PROTOCOLS = {"split": SplitProtocol, "fedlora": Protocol, "gradfree": GradfreeProtocol, "offsite": Protocol}


@dataclass
class Tally:
    malformed: int = 0
    refused: int = 0
    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def _call(handler: Callable[..., Message], msg: Message, ctx: Context, proto: Protocol, tally: Tally,
          where: str) -> None:
    """Send ``msg`` to the client: a refusal (MessageError) or a finite reply; anything else fails the test."""
    try:
        reply = handler(_sent(msg), ctx)
    except MessageError as exc:  # a refusal: Flower's runtime makes it the client's error reply
        tally.refused += 1
        head = str(exc).split(":")[-1][:40]
        tally.errors[head] = tally.errors.get(head, 0) + 1
        proto.refused()
        return
    except Exception as exc:  # noqa: BLE001 - anything else is a crash: report the message
        raise AssertionError(f"{where}: {type(exc).__name__}: {exc}\n  message: {describe(msg.content)}") from exc
    finite_reply(reply, where, msg)
    tally.answered += 1
    proto.answered(reply)


def test_every_registered_message_type_is_fuzzed():
    assert set(message_handlers()) == set(MESSAGE_TYPES)


def _without_compute(monkeypatch: pytest.MonkeyPatch, kit: Kit) -> None:
    """Replace each handler's compute (the model's forward, backward and local steps) by a canned result.

    What stays is everything the handler does with the message: unpacking and checking it,
    the privacy state's sequence checks and budget, loading the adapter (names and shapes),
    and packing the reply.
    """
    from guardedtuning.clients import fedlora_client, gradfree_client, offsite_client, split_client
    from guardedtuning.models.lora import load_trainable

    state = {k: v.clone() for k, v in kit.design.global_state().items()}
    module = torch.nn.Module()
    module._params = torch.nn.ParameterDict({k.replace(".", "__"): torch.nn.Parameter(v) for k, v in state.items()})

    def load(start: dict[str, torch.Tensor], source: str) -> None:  # the real names/shapes check
        load_trainable(module, {k.replace(".", "__").join(("_params.", "")): v for k, v in start.items()},
                       source=source)

    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    acts = {"h": torch.zeros(2, 4, 8), "mask": torch.ones(2, 4, dtype=torch.uint8)}

    def split_step(setup, priv, step, start, round_state, *, source):
        if start is not None:
            load(start, source)
        elif "split.lora" not in round_state:
            raise MessageError(f"{source}: step {step.step} arrived without step 0")
        last = step.step == step.steps
        return split_client.StepOutcome({} if last else {"split.lora": {"flat": np.zeros(3, np.float32)}},
                                        acts=None if last else dict(acts), update=zeros)

    def release_stage(setup, priv, stage, start, *, source):
        load(start, source)
        n, t = setup.all_rows.input_ids.shape
        return {"h": torch.zeros(n, t, kit.design.hidden), "mask": torch.ones(n, t, dtype=torch.uint8)}, {
            "flat": np.zeros(3, np.float32)}

    def train(setup, start, *args, source=None, **kwargs):
        if isinstance(start, dict):
            load(start, source)
        return zeros, [1.0]

    monkeypatch.setattr(split_client, "split_step", split_step)
    monkeypatch.setattr(gradfree_client, "release_stage", release_stage)
    monkeypatch.setattr(gradfree_client, "train_stage", lambda setup, priv, stage, z, start: (zeros, [1.0]))
    monkeypatch.setattr(fedlora_client, "fedlora_train", lambda setup, start, **kw: train(setup, start, **kw))
    monkeypatch.setattr(offsite_client, "offsite_train",
                        lambda setup, priv, train_, start, **kw: train(setup, start, **kw))


@pytest.mark.parametrize("full", [False, True], ids=["decoding", "full-handler"])
@pytest.mark.parametrize("mtype", sorted(MESSAGE_TYPES))
def test_fuzz_client_handler(mtype, full, kits, monkeypatch):
    kit = kits[MESSAGE_TYPES[mtype]]
    flat, handler, proto = kit.flat, message_handlers()[mtype], PROTOCOLS[MESSAGE_TYPES[mtype]](kit)
    assert proto.mtype == mtype
    if not full:
        _without_compute(monkeypatch, kit)
    count = FULL_HANDLER if full else PER_TYPE
    tally = Tally()

    prefixes: dict[int, tuple[RecordDict, tuple, list[Message]]] = {}

    def after_valid(k: int) -> tuple[Context, list[Message]]:
        """A client that answered the first ``k`` valid messages (computed once, then its state copied)."""
        if k not in prefixes:
            proto.reset()
            proto.package = True
            ctx, sent = _context(flat), []
            for _ in range(k):
                sent.append(proto.next())
                _call(handler, sent[-1], ctx, proto, tally, "valid message")
            prefixes[k] = (ctx.state, proto.where, sent)
        state, where, sent = prefixes[k]
        proto.reset(where)
        ctx = _context(flat)
        for key, record in state.items():  # the handlers replace records, never change one in place
            ctx.state[key] = type(record)(dict(record.items()))
        return ctx, list(sent)

    @settings(FUZZ, max_examples=count // 2)
    @given(CHOICES)
    def fuzz(c: Choices) -> None:
        ctx, sent = after_valid(c.pick((0, 1, 0, 2)))
        proto.package = c.int(0, 9) == 0
        for i in range(2):
            how = c.pick(("mutated", "replay", "mutated", "shifted", "mutated", "junk"))
            if how == "replay" and sent:
                old = c.pick(sent)
                msg = Message(RecordDict(dict(old.content.items())), dst_node_id=1000, message_type=mtype)
            elif how in ("shifted", "replay"):
                msg = proto.shifted(c)
            elif how == "junk":
                msg = Message(junk_content(c), dst_node_id=1000, message_type=mtype)
            else:
                msg = Message(bad_content(c, proto.next().content), dst_node_id=1000, message_type=mtype)
            sent.append(msg)
            tally.malformed += 1
            _call(handler, msg, ctx, proto, tally, f"malformed message {i} ({how})")
        if c.int(0, 2) == 0:
            _call(handler, proto.next(), ctx, proto, tally, "valid message after the malformed ones")

    fuzz()
    print(f"{mtype}: {tally}")
    assert tally.malformed >= count, tally
    assert tally.refused > count // 4 and tally.answered > count // 20, tally  # both outcomes exercised


# ------------------------------------------------------------------ server side


BAD, HONEST = 1, 2


class FuzzGrid(Grid):
    """Answers each pushed message at once with ``answer(node, message, exchange)`` (None: no reply)."""

    def __init__(self) -> None:
        self.answer: Callable[[int, Message, int], Message | None] = lambda n, m, e: None
        self.exchanges = 0
        self.replies: dict[str, Message] = {}

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self._run = run

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return [BAD, HONEST]

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return []

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = []
        for msg in messages:
            _sent(msg)
            reply = self.answer(msg.metadata.dst_node_id, msg, self.exchanges)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        self.exchanges += 1
        return ids

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return self.pull_messages(self.push_messages(messages))


EXCHANGES = {"split": 3, "gradfree": 2, "fedlora": 1, "offsite": 1}  # round trips of a round (local steps 2)
SERVER_EXAMPLES = 80  # rounds per design, each with one malformed reply (see the module docstring)


def honest_reply(kit: Kit, msg: Message, exchange: int, update: dict[str, torch.Tensor]) -> Message:
    """What a well-behaved client answers at ``exchange`` of a round."""
    design, now = kit.design, time.time()
    metrics = MetricRecord({"compute_s": 0.01, "t_start": now, "t_end": now + 0.01, "peak_mem_mb": 10.0})
    if exchange < EXCHANGES[kit.flat["recipe"]] - 1:
        d = design.hidden
        if kit.flat["recipe"] == "split":
            acts = {"h": 0.1 * torch.ones(2, 4, d), "mask": torch.ones(2, 4, dtype=torch.uint8),
                    "labels": torch.zeros(2, dtype=torch.long)}
        else:
            acts = {"h": 0.1 * torch.ones(3, 4, d), "mask": torch.ones(3, 4, dtype=torch.uint8)}
        return Message(RecordDict({"acts": tensors_to_record(acts), "metrics": metrics}), reply_to=msg)
    metrics["num-examples"], metrics["train_loss"] = 4.0, 1.0
    return Message(RecordDict({"update": tensors_to_record(update), "metrics": metrics,
                               "privacy": ConfigRecord({"mechanism": "none", "dp_epsilon": 1.0})}), reply_to=msg)


def bad_reply(c: Choices, honest: Message, msg: Message) -> Message | None:
    how = c.pick(("mutated", "mutated", "mutated", "error", "junk", "budget", "none"))
    if how == "none":
        return None  # no reply before comm.timeout
    if how == "error":
        return Message(Error(code=c.pick((0, 1, -1, 2**31)), reason=c.pick(TEXTS)), reply_to=msg)
    if how == "junk":
        return Message(junk_content(c), reply_to=msg)
    if how == "budget":
        return Message(RecordDict({"metrics": bad_metrics(c, MetricRecord({"budget-spent": 1.0}))}), reply_to=msg)
    return Message(bad_content(c, honest.content), reply_to=msg)


@pytest.mark.parametrize("recipe", sorted(EXCHANGES))
def test_fuzz_server_round(recipe, kits, monkeypatch):
    from guardedtuning.server_app.common import make_strategy
    from guardedtuning.server_app.engine import Round
    from guardedtuning.wire.records import record_to_tensors

    kit = kits[recipe]
    run, design = kit.run, kit.design
    strategy = make_strategy(run.cfg, design.message_type)
    grid = FuzzGrid()
    drops: list[tuple[int | None, str]] = []
    original_drop = run.drop
    monkeypatch.setattr(run, "drop", lambda node, reason, round_: (drops.append((node, reason)),
                                                                    original_drop(node, reason, round_)))
    tally: dict[str, int] = {}
    state = {"round": 0}

    @settings(FUZZ, max_examples=SERVER_EXAMPLES)
    @given(CHOICES)
    def fuzz(c: Choices) -> None:
        state["round"] += 1
        number = state["round"]
        at = c.int(0, EXCHANGES[recipe] - 1)  # the exchange at which the bad client misbehaves
        kind = "final" if at == EXCHANGES[recipe] - 1 else "acts"
        tally[kind] = tally.get(kind, 0) + 1
        before = {k: v.clone() for k, v in design.global_state().items()}
        update = {k: 1e-3 * torch.ones_like(v) for k, v in before.items()}

        def answer(node: int, msg: Message, exchange: int) -> Message | None:
            honest = honest_reply(kit, msg, exchange - first, update)
            return bad_reply(c, honest, msg) if node == BAD and exchange - first == at else honest

        first = grid.exchanges
        grid.answer = answer
        rnd = Round(grid, run, strategy, number, 0)
        since, seen = len(strategy.rejections), len(drops)
        messages = list(strategy.configure_train(number, tensors_to_record(before),
                                                 ConfigRecord(design.round_config(rnd)), grid))
        outcome = design.train(rnd, design.outgoing(rnd, messages))  # what run_rounds does, less evaluation
        new = None
        if outcome.final is not None:
            run.note_privacy(outcome.final.ok())
            new = run.aggregate(strategy, number, outcome.final, since=since)
        else:
            run.unaggregated(strategy, number, since=since)
        if new is not None:
            design.set_global(record_to_tensors(new, source="aggregate"))
        dropped = [(n, r) for n, r in drops[seen:]]
        assert all(r for _, r in dropped), dropped  # every drop gives its reason
        assert not any(n == HONEST or f"node {HONEST}" in r for n, r in dropped), dropped  # only the bad one
        after = design.global_state()
        assert all(bool(torch.isfinite(v).all()) for v in after.values())
        if any(n == BAD or f"node {BAD}" in r for n, r in dropped):  # the bad client left: the honest one's mean
            assert new is not None, "the round lost the honest client's update"
            for k, v in before.items():
                torch.testing.assert_close(after[k], (v.double() + update[k].double()).float(), rtol=0, atol=1e-6)
        if hasattr(design, "model"):  # split's top trains on the server
            assert all(bool(torch.isfinite(p).all()) for p in design.model.top.parameters())

    fuzz()
    print(f"{recipe}: malformed replies by kind {tally}, drops {len(drops)}")
    assert sum(tally.values()) >= SERVER_EXAMPLES
    assert len(drops) > SERVER_EXAMPLES // 4
