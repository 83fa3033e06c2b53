"""The typed messages of split, gradfree and offsite (wire/split.py, wire/gradfree.py, wire/offsite.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from guardedtuning import compat
from guardedtuning.errors import MessageError
from guardedtuning.models.emulator import package_digest
from guardedtuning.wire import gradfree, offsite, split
from guardedtuning.wire.records import tensors_to_record


@pytest.fixture(autouse=True)
def _task():
    """A Message needs the run it belongs to."""
    task = compat.private("TaskIdentity")
    task.task_id, task.run_id, task.node_id = 1, 1, 1


def _as_reply(msg: Message, content: RecordDict) -> Message:
    """What a server reads: ``content`` as the reply of ``msg``'s node."""
    return Message(content, reply_to=msg)


def _client_side(msg: Message) -> Message:
    """The message as the client receives it (same content)."""
    return Message(msg.content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)


# ----------------------------------------------------------------------------- split

def test_step_message_round_trips_and_is_checked():
    grad = torch.randn(2, 3, 4)
    step = split.unpack_step(split.step_message(5, 2, 1, 3, grad, resumed_after=1), source="t")
    assert (step.round_, step.step, step.steps, step.resumed_after) == (2, 1, 3, 1)
    torch.testing.assert_close(step.grad, grad)
    with pytest.raises(MessageError, match=r"step 4 is outside 0..3"):
        split.unpack_step(split.step_message(5, 2, 4, 3, grad), source="t")
    with pytest.raises(MessageError, match="grad"):  # from step 1 on, the gradient is required
        split.unpack_step(split.step_message(5, 2, 1, 3, None), source="t")
    first = Message(RecordDict({"config": ConfigRecord({"server-round": 1, "step": 0, "steps": 3})}),
                    dst_node_id=5, message_type=split.MESSAGE_TYPE)
    assert split.unpack_step(first, source="t").grad is None


def test_acts_record_keeps_integer_codes_and_unpack_checks_them():
    acts = {"mask": torch.ones(2, 3, dtype=torch.uint8), "labels": torch.tensor([0, 1]), "h": torch.randn(2, 3, 4)}
    msg = split.step_message(5, 1, 1, 2, torch.zeros(2, 3, 4))
    got = split.unpack_acts(_as_reply(msg, RecordDict({"acts": split.acts_record(acts)})), hidden=4, max_batch=2,
                            num_labels=2, kind="encoder")
    torch.testing.assert_close(got.h, acts["h"])
    with pytest.raises(MessageError, match="class ids in 0..0"):
        split.unpack_acts(_as_reply(msg, RecordDict({"acts": split.acts_record(acts)})), hidden=4, max_batch=2,
                          num_labels=1, kind="encoder")
    codes = {"codes": np.full((2, 3, 4), 128, np.uint8), "scales": np.ones((2, 3), np.float32),
             "meta": np.array([8, 4], np.int32)}  # code 128: the value 0
    record = split.acts_record(codes)
    assert record["codes"].numpy().dtype == np.uint8
    assert split.dequantize(record, source="t").shape == (2, 3, 4)
    with pytest.raises(MessageError, match="an 8-bit code is 0"):  # outside the format's 1..255
        split.dequantize(split.acts_record({**codes, "codes": np.zeros((2, 3, 4), np.uint8)}), source="t")
    codes["scales"] = np.full((2, 3), np.inf, np.float32)
    with pytest.raises(MessageError, match="cannot be decoded"):
        split.dequantize(split.acts_record(codes), source="t")


# ----------------------------------------------------------------------------- gradfree

def test_gradfree_stages_and_hidden_states():
    z = torch.randn(4, 3, 2)
    msg = _client_side(gradfree.train_message(9, 3, z, 2))
    stage = gradfree.unpack_stage(msg, source="t")
    assert (stage.round_, stage.stage, stage.resumed_after) == (3, gradfree.TRAIN, 2)
    torch.testing.assert_close(gradfree.unpack_hidden(msg, expected=(4, 3, 2), source="t"), z)
    with pytest.raises(MessageError, match=r"expected \(5, 3, 2\)"):
        gradfree.unpack_hidden(msg, expected=(5, 3, 2), source="t")
    bad = Message(RecordDict({"config": ConfigRecord({"server-round": 1, "stage": "guess"})}), dst_node_id=9,
                  message_type=gradfree.MESSAGE_TYPE)
    with pytest.raises(MessageError, match="stage is 'guess'"):
        gradfree.unpack_stage(bad, source="t")


def test_a_gradfree_release_with_labels_is_refused_on_both_sides():
    acts = {"h": torch.randn(2, 3, 4), "mask": torch.ones(2, 3, dtype=torch.uint8)}
    record = gradfree.release_record(acts)
    h, mask = gradfree.unpack_release(_as_reply(gradfree.train_message(9, 1, torch.zeros(1), 0),
                                                RecordDict({"acts": record})), hidden=4, max_rows=2)
    assert h.shape == (2, 3, 4) and mask.dtype == torch.long
    with pytest.raises(MessageError, match="labels never leave"):
        gradfree.release_record({**acts, "labels": torch.tensor([0, 1])})
    leaky = ArrayRecord(dict(record.items()))
    leaky["labels"] = tensors_to_record({"labels": torch.tensor([0, 1])})["labels"]
    with pytest.raises(MessageError, match="labels never leave"):
        gradfree.unpack_release(_as_reply(gradfree.train_message(9, 1, torch.zeros(1), 0),
                                          RecordDict({"acts": leaky})), hidden=4, max_rows=2)


# ----------------------------------------------------------------------------- offsite

def test_offsite_package_travels_with_its_digest():
    package = {"w": torch.randn(3, 2)}
    digest = package_digest(package)
    base = Message(RecordDict({"config": ConfigRecord({"server-round": 2, "digest": digest, "resumed-after": 0})}),
                   dst_node_id=4, message_type=offsite.MESSAGE_TYPE)
    assert offsite.unpack_train(base, source="t").package is None
    carried = offsite.with_package(base, tensors_to_record(package))
    assert offsite.EMULATOR_KEY not in base.content  # a copy: the strategy's content is shared
    got = offsite.unpack_train(carried, source="t")
    assert got.round_ == 2 and got.digest == digest
    torch.testing.assert_close(got.package["w"], package["w"])
    damaged = offsite.with_package(base, tensors_to_record({"w": package["w"] + 1}))
    with pytest.raises(MessageError, match="damaged on the way"):
        offsite.unpack_train(damaged, source="t")
