"""Issue 13, item 1: both directions of the cut compressed, padding never sent, bytes as serialised.

- the codec (:mod:`guardedtuning.privacy.quantize`) through the real wire functions, both ways:
  nearest rounding within half a step, stochastic rounding unbiased (a statistical test) and
  within one step, also on the uplink as a client releases (``ClientPrivacy.release``);
- the downlink gradient decoded as strictly as the uplink: each malformed payload is a
  MessageError naming what is wrong, a fuzzer finds nothing else, and in a run the client
  that gets one is dropped from that round while the run goes on;
- padding trimmed both ways leaves the losses and the trained weights unchanged (encoder and
  decoder), and sends fewer bytes;
- the record's bytes are the serialised messages' lengths (Flower's own object walk), which
  hold the new arrays;
- a tiny split run with 8-bit gradients and activations learns as the fp32 one does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardedtuning import compat
from guardedtuning.clients.client_app import app as client_app
from guardedtuning.config import PrivacyConfig, build_config
from guardedtuning.errors import ConfigError, MessageError
from guardedtuning.inprocess import run_in_process
from guardedtuning.models.split import IGNORE
from guardedtuning.privacy.client import ClientPrivacy
from guardedtuning.privacy.quantize import QMAX, quantize_activations
from guardedtuning.results import read_checkpoint
from guardedtuning.server_app.server_app import execute
from guardedtuning.wire import split as wire
from guardedtuning.wire.records import message_nbytes
from tests.local_grid import LocalGrid

SOURCE = "test message"


@pytest.fixture(autouse=True)
def _task():
    task = compat.private("TaskIdentity")
    task.task_id, task.run_id, task.node_id = 1, 1, 1


def _mask(rng: np.random.Generator, b: int, t: int) -> torch.Tensor:
    """Right-padded (B, T) 0/1 mask, each row at least one real token (as collate makes them)."""
    lengths = rng.integers(1, t + 1, size=b)
    return torch.from_numpy((np.arange(t)[None, :] < lengths[:, None]).astype(np.uint8))


def _as_reply(acts: ArrayRecord) -> Message:
    request = Message(RecordDict(), dst_node_id=9, message_type=wire.MESSAGE_TYPE)
    request.metadata.__dict__["_message_id"] = "request"
    return Message(RecordDict({"acts": acts}), reply_to=request)


def _wire_step(grad_record: ArrayRecord) -> Message:
    """A ``train.split`` step-1 message carrying ``grad_record`` as its gradient."""
    msg = wire.step_message(1000, 1, 1, 3, None, 0)
    msg.content[wire.GRAD_KEY] = grad_record
    return msg


def _step_scales(x: torch.Tensor, bits: int) -> torch.Tensor:
    """One quantization step per token: max|v| / q."""
    return x.abs().amax(dim=-1, keepdim=True) / QMAX[bits]


# ------------------------------------------------------------------ the codec, both ways, through the wire

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(0, 4), t=st.integers(1, 9), d=st.integers(1, 11), bits=st.sampled_from([8, 4]),
       trim=st.booleans(), exponent=st.integers(-30, 4), seed=st.integers(0, 2**32 - 1))
def test_quantize_dequantize_error_is_within_half_a_step_both_ways(b, t, d, bits, trim, exponent, seed):
    """Nearest rounding: every decoded value within s/2 of the sent one, uplink and downlink, dense or trimmed."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy((rng.standard_normal((b, t, d)) * 10.0 ** exponent).astype(np.float32))
    mask = _mask(rng, b, t) if b else torch.zeros((0, t), dtype=torch.uint8)
    half = _step_scales(x, bits) / 2 + x.abs() * 2.0**-22  # + the float32 rounding of codes * scale

    # downlink: the server's gradient -> the client's (B, T, D), zeros at padding when trimmed
    msg = wire.step_message(1000, 1, 1, 3, x, 0, mask=mask if trim else None, bits=bits)
    got = wire.unpack_step(msg, source=SOURCE).grad_for(mask, dim=d, source=SOURCE)
    assert got.shape == x.shape and got.dtype == torch.float32
    expect = x * mask[..., None] if trim else x
    assert bool(((got - expect).abs() <= half).all())
    if trim:
        assert bool((got[mask == 0] == 0).all())

    # uplink: a client's quantized release -> the server's checked activations
    release = {"mask": mask, "labels": torch.zeros(b, dtype=torch.long),
               **quantize_activations(x, bits=bits).arrays()}
    acts = wire.unpack_acts(_as_reply(wire.acts_record(release, trim=trim)), hidden=d, max_batch=4, num_labels=2,
                            kind="encoder", max_length=16)
    assert acts.h.shape == x.shape
    assert bool(((acts.h - expect).abs() <= half).all())


def test_stochastic_rounding_is_unbiased_and_within_one_step():
    """E[decoded] = value to within 5 standard errors at every coordinate; nearest rounding is visibly biased."""
    draws, bits = 4000, 4
    x = torch.tensor([[0.9, 0.31, -0.55, 0.07, -0.9, 0.123, 0.0]])  # off the 4-bit grid (step 0.9 / 7)
    step = float(x.abs().max()) / QMAX[bits]
    gen = torch.Generator().manual_seed(3)
    decoded = torch.stack([
        wire.unpack_step(wire.step_message(1, 1, 1, 2, x[None], 0, bits=bits, generator=gen),
                         source=SOURCE).grad[0] for _ in range(draws)])  # (draws, 1, D)
    assert bool(((decoded - x).abs() < step * (1 + 1e-6)).all()), "stochastic rounding moved a value a full step"
    frac = (x / step) - torch.floor(x / step)
    stderr = step * torch.sqrt(frac * (1 - frac) / draws)  # the Bernoulli's standard error, 0 on the grid
    bias = (decoded.double().mean(0) - x.double()).abs()
    assert bool((bias <= 5 * stderr + 1e-6).all()), (bias, stderr)
    nearest = wire.unpack_step(wire.step_message(1, 1, 1, 2, x[None], 0, bits=bits), source=SOURCE).grad[0]
    assert float((nearest - x).abs().max()) > 10 * float(stderr.max()), "the test could not tell the two apart"
    # the draws do vary (not one rounding repeated)
    assert len({tuple(row.flatten().tolist()) for row in decoded[:50]}) >= 4


def test_the_uplink_rounds_stochastically_as_a_client_releases():
    """``split.stochastic-rounding`` reaches ``ClientPrivacy.release``: its quantized release is unbiased."""
    h = torch.tensor([[[0.9, 0.31, -0.55, 0.07]]])
    mask = torch.ones(1, 1, dtype=torch.long)
    knobs = PrivacyConfig(mechanism="none", quantize_bits=4)
    step = 0.9 / QMAX[4]

    def decoded(priv: ClientPrivacy, s: int) -> torch.Tensor:
        out = priv.release(h, mask, input_ids=torch.zeros(1, 1, dtype=torch.long), step=s)
        record = wire.acts_record({**out, "labels": torch.zeros(1, dtype=torch.long)})
        return wire.unpack_acts(_as_reply(record), hidden=4, max_batch=1, num_labels=2, kind="encoder").h[0, 0]

    stochastic = ClientPrivacy(seed=5, knobs=knobs, stochastic_rounding=True)
    mean = torch.stack([decoded(stochastic, s) for s in range(3000)]).double().mean(0)
    frac = (h[0, 0] / step) - torch.floor(h[0, 0] / step)
    assert bool(((mean - h[0, 0].double()).abs() <= 5 * step * torch.sqrt(frac * (1 - frac) / 3000) + 1e-6).all())
    nearest = ClientPrivacy(seed=5, knobs=knobs)
    assert torch.equal(decoded(nearest, 0), decoded(nearest, 1))  # deterministic without the key
    cfg = build_config({"privacy.quantize-bits": 4, "split.stochastic-rounding": True, "dp.enabled": False})
    assert ClientPrivacy.for_client(cfg, pid=0, num_examples=10, mechanism=stochastic.mechanism,
                                    state={}).stochastic_rounding


def test_the_config_keys_are_validated_with_the_key_value_and_fix():
    with pytest.raises(ConfigError, match=r"`split.grad-bits` must be 0 \(float32 gradients\), 8 or 4 but is 3; "
                                          r"set it with --set split.grad-bits="):
        build_config({"split.grad-bits": 3})
    with pytest.raises(ConfigError, match="split.stochastic-rounding"):
        build_config({"split.stochastic-rounding": "sometimes"})
    cfg = build_config({})
    assert (cfg.split.grad_bits, cfg.split.stochastic_rounding, cfg.split.trim_padding) == (0, False, True)


# ------------------------------------------------------------------ malformed gradients: MessageError, named

def _quantized_grad(shape=(2, 3, 5), bits=8, mask=None) -> dict[str, np.ndarray]:
    g = torch.linspace(-1, 1, int(np.prod(shape))).reshape(shape)
    record = wire.grad_record(g, bits=bits, mask=mask)
    return {k: record[k].numpy() for k in record.keys()}


def _codes_with(value: int) -> dict[str, np.ndarray]:
    arrays = _quantized_grad()
    arrays["codes"] = arrays["codes"].copy()
    arrays["codes"][0, 0, 0] = value
    return arrays


MALFORMED = {
    "codes of int16": (lambda a: {**a, "codes": a["codes"].astype(np.int16)}, "codes int16"),
    "codes of the wrong width": (lambda a: {**a, "codes": a["codes"][..., :-1].copy()}, "code columns"),
    "codes of rank 4": (lambda a: {**a, "codes": a["codes"][None].copy()}, "codes uint8 (1, 2, 3, 5)"),
    "an 8-bit code 0": (lambda a: _codes_with(0), "an 8-bit code is 0"),
    "a NaN scale": (lambda a: {**a, "scales": np.where(a["scales"] > 0, np.nan, 0).astype(np.float32)}, "scales"),
    "a negative scale": (lambda a: {**a, "scales": -a["scales"]}, "non-negative"),
    "scales of float64": (lambda a: {**a, "scales": a["scales"].astype(np.float64)}, "scales float64"),
    "scales of the wrong shape": (lambda a: {**a, "scales": a["scales"][:, :2].copy()}, "scales float32 (2, 2)"),
    "3-bit meta": (lambda a: {**a, "meta": np.array([3, 5], np.int32)}, "3-bit codes"),
    "float meta": (lambda a: {**a, "meta": np.array([8, 5], np.float32)}, "meta float32"),
    "no scales": (lambda a: {k: v for k, v in a.items() if k != "scales"}, "'scales'"),
    "a scale beyond float32 / 127": (lambda a: {**a, "scales": np.full_like(a["scales"], 3e38)}, "non-finite"),
    "both h and codes": (lambda a: {**a, "h": np.zeros((2, 3, 5), np.float32)}, "both 'h' and 'codes'"),
    "float h of rank 1": (lambda a: {"h": np.zeros(5, np.float32)}, "shape (5,)"),
    "float h of inf": (lambda a: {"h": np.full((2, 3, 5), np.inf, np.float32)}, "NaN or inf"),
    "float h of 1e300 (float64)": (lambda a: {"h": np.full((2, 3, 5), 1e300)}, "non-finite after the cast"),
    "integer h": (lambda a: {"h": np.zeros((2, 3, 5), np.int32)}, "expected a float dtype"),
    "no array": (lambda a: {}, "lacks 'h'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_gradient_is_a_message_error_naming_what_is_wrong(case):
    rewrite, says = MALFORMED[case]
    arrays = rewrite(_quantized_grad())
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    with pytest.raises(MessageError, match="activation gradient") as err:
        wire.unpack_step(_wire_step(record), source=SOURCE)
    assert says in str(err.value) and SOURCE in str(err.value)


def test_a_trimmed_gradient_must_have_one_row_per_real_token_of_the_clients_batch():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for bits in (0, 8, 4):
        ok = wire.unpack_step(wire.step_message(1, 1, 1, 2, torch.ones(2, 3, 5), 0, mask=mask, bits=bits),
                              source=SOURCE)
        assert ok.grad.shape == (3, 5)
        assert torch.equal(ok.grad_for(mask, dim=5, source=SOURCE) != 0, mask[..., None].bool().expand(2, 3, 5))
        with pytest.raises(MessageError, match="3 token rows but the attention mask has 4 real tokens"):
            ok.grad_for(torch.tensor([[1, 1, 1], [1, 0, 0]]), dim=5, source=SOURCE)
        with pytest.raises(MessageError, match="rows of width 5, expected 4"):
            ok.grad_for(mask, dim=4, source=SOURCE)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_the_gradient_decoder_rejects_or_gives_a_finite_gradient_of_the_batchs_shape(data):
    """Random damage to a valid gradient payload: a MessageError, or a finite (B, T, D) float32 gradient."""
    b, t, d = 2, 3, 5
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    bits = data.draw(st.sampled_from([0, 8, 4]))
    trim = data.draw(st.booleans())
    record = wire.grad_record(torch.randn(b, t, d, generator=torch.Generator().manual_seed(0)),
                              mask=mask if trim else None, bits=bits)
    arrays = {k: record[k].numpy().copy() for k in record.keys()}
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(arrays)))
        how = data.draw(st.sampled_from(["value", "dtype", "shape", "drop"]))
        arr = arrays[key]
        if how == "drop":
            del arrays[key]
            if not arrays:
                break
        elif how == "value" and arr.size:
            flat = arr.reshape(-1)
            i = data.draw(st.integers(0, flat.size - 1))
            if arr.dtype.kind == "f":
                flat[i] = data.draw(st.sampled_from([np.nan, np.inf, -1.0, 3e38, 1e-45, 0.0, 7.0]))
            else:
                flat[i] = data.draw(st.integers(0, 255 if arr.dtype == np.uint8 else 2**20))
        elif how == "dtype":
            arrays[key] = arr.astype(data.draw(st.sampled_from([np.float64, np.float16, np.int32, np.uint8])))
        elif how == "shape":
            arrays[key] = arr.reshape(-1)[: max(0, arr.size - data.draw(st.integers(0, 3)))].copy()
    bad = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    try:
        step = wire.unpack_step(_wire_step(bad), source=SOURCE)
        grad = step.grad_for(mask, dim=d, source=SOURCE)
    except MessageError as exc:
        assert SOURCE in str(exc)
        return
    assert grad.dtype == torch.float32 and bool(torch.isfinite(grad).all())
    assert grad.dim() == 3  # (B, T, D); a dense one of another shape is refused by the backward's shape check


# ------------------------------------------------------------------ in a run: the client is dropped, the run goes on


class RequestTamperGrid(LocalGrid):
    """A LocalGrid that may rewrite a message before the client gets it (``rewrite(node, message)``)."""

    def __init__(self, *args, rewrite, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rewrite = rewrite

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        out = []
        for msg in messages:
            self.rewrite(msg.metadata.dst_node_id, msg)
            out.append(msg)
        return super().push_messages(out)


def _events(flat):
    return [json.loads(x) for x in (Path(flat["output.dir"]) / "events.jsonl").read_text().splitlines()]


def _history_bytes(record) -> tuple[int, int]:
    return sum(h["bytes_up"] for h in record["history"]), sum(h["bytes_down"] for h in record["history"])


def test_a_client_sent_a_malformed_quantized_gradient_is_dropped_and_the_run_goes_on(tiny_flat):
    flat = {**tiny_flat, "split.grad-bits": 8, "privacy.quantize-bits": 8}
    hits = []

    def rewrite(node, msg):
        grad = msg.content.get(wire.GRAD_KEY) if msg.metadata.message_type == wire.MESSAGE_TYPE else None
        conf = msg.content.get("config")
        if node == 1001 and grad is not None and conf["server-round"] == 1 and conf["step"] == 2:
            scales = grad["scales"].numpy().copy()
            scales[0] = np.nan
            grad["scales"] = Array(scales)
            hits.append(node)

    cfg = build_config(flat)
    grid = RequestTamperGrid(client_app, cfg.federation.num_clients, cfg.flat(), rewrite=rewrite)
    record = execute(cfg, grid)
    assert hits == [1001]
    assert len(record["history"]) == 2 and record["utility"]["value"] is not None
    dropped = [e for e in _events(flat) if e["event"] == "dropped"]
    assert [(d["round"], d["node"]) for d in dropped] == [(1, 1001)], dropped
    assert "quantized activation gradient cannot be decoded" in dropped[0]["reason"]
    assert "scales" in dropped[0]["reason"]
    top = read_checkpoint(flat["output.dir"])["state"]["top"]
    assert all(bool(torch.isfinite(v).all()) for v in top.values())


# ------------------------------------------------------------------ trimming: same losses, fewer bytes


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_trimming_padding_leaves_the_losses_and_the_weights_unchanged(tiny_flat, tmp_path, model):
    base = {**tiny_flat, "model.name": model, "federation.rounds": 2, "train.local-steps": 3}
    records, states = {}, {}
    for trim in (False, True):
        flat = {**base, "split.trim-padding": trim, "output.dir": str(tmp_path / f"trim-{trim}")}
        records[trim] = run_in_process(build_config(flat))
        states[trim] = read_checkpoint(flat["output.dir"])["state"]
    losses = {k: [h["train_loss"] for h in r["history"]] for k, r in records.items()}
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    assert records[True]["utility"]["value"] == pytest.approx(records[False]["utility"]["value"], abs=1e-9)
    for part in ("global_bottom", "top"):
        for name, v in states[False][part].items():
            torch.testing.assert_close(states[True][part][name], v, rtol=1e-4, atol=1e-6)
    up = {k: _history_bytes(r)[0] for k, r in records.items()}
    down = {k: _history_bytes(r)[1] for k, r in records.items()}
    assert up[True] < up[False] and down[True] < down[False], (up, down)


def test_a_trimmed_decoder_release_rebuilds_ignore_labels_at_padding():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.uint8)
    labels = torch.tensor([[5, 6, IGNORE], [7, 8, 9]])
    h = torch.randn(2, 3, 4)
    record = wire.acts_record({"h": h, "mask": mask, "labels": labels}, trim=True)
    assert tuple(record["h"].shape) == (5, 4) and tuple(record["labels"].shape) == (5,)
    acts = wire.unpack_acts(_as_reply(record), hidden=4, max_batch=2, num_labels=10, kind="decoder")
    assert torch.equal(acts.labels, labels) and torch.equal(acts.h, h * mask[..., None])
    # a label at padding that is not IGNORE is kept: the labels go dense
    odd = labels.clone()
    odd[0, 2] = 3
    record = wire.acts_record({"h": h, "mask": mask, "labels": odd}, trim=True)
    assert tuple(record["labels"].shape) == (2, 3)
    assert torch.equal(wire.unpack_acts(_as_reply(record), hidden=4, max_batch=2, num_labels=10,
                                        kind="decoder").labels, odd)


def test_a_trimmed_release_with_a_lying_mask_is_refused():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.uint8)
    good = wire.acts_record({"h": torch.randn(1, 3, 4), "mask": mask, "labels": torch.zeros(1, dtype=torch.long)},
                            trim=True)
    cases = {
        "more real tokens": ({"mask": Array(np.array([[1, 1, 1]], np.uint8))}, "2 token rows but the attention mask has 3"),
        "a huge mask": ({"mask": Array(np.ones((1, 10_000), np.uint8))}, "T <= 16"),
        "rows of the wrong width": ({"h": Array(np.zeros((2, 7), np.float32))}, "expected float (N, 4)"),
        "a non-0/1 mask": ({"mask": Array(np.array([[1, 2, 0]], np.uint8))}, "of 0/1"),
    }
    for name, (change, says) in cases.items():
        record = ArrayRecord({**{k: good[k] for k in good.keys()}, **change})
        with pytest.raises(MessageError, match="reply of node") as err:
            wire.unpack_acts(_as_reply(record), hidden=4, max_batch=2, num_labels=2, kind="encoder", max_length=16)
        assert says in str(err.value), (name, str(err.value))


def test_quantized_codes_for_more_values_than_a_batch_can_hold_are_refused_before_decoding(monkeypatch):
    """Review finding: 4-bit codes decode to 8x their size in float32; a client's reply of many rows was
    dequantized before the batch/length limits were checked. Now the count is checked first."""
    from guardedtuning.privacy import quantize

    decoded = []
    original = quantize.dequantize_activations
    monkeypatch.setattr(wire, "dequantize_activations", lambda q: decoded.append(q) or original(q))
    rows = quantize_activations(torch.randn(400, 4), bits=4)  # (N, D) rows: 400 > 2 rows x 16 tokens
    record = wire.acts_record({"h": torch.zeros(1, 1, 4), "mask": torch.ones(1, 1, dtype=torch.uint8),
                               "labels": torch.zeros(1, dtype=torch.long)})
    record = ArrayRecord({**{k: record[k] for k in record.keys() if k != "h"},
                          **{k: Array(v) for k, v in rows.arrays().items()}})
    with pytest.raises(MessageError, match="more than the 128"):
        wire.unpack_acts(_as_reply(record), hidden=4, max_batch=2, num_labels=2, kind="encoder", max_length=16)
    assert decoded == []


# ------------------------------------------------------------------ bytes: the record counts the serialised payloads


def test_the_recorded_bytes_are_the_serialised_messages_lengths_and_hold_the_new_arrays(tiny_flat):
    flat = {**tiny_flat, "split.grad-bits": 8, "privacy.quantize-bits": 8, "split.stochastic-rounding": True}
    cfg = build_config(flat)
    grid = LocalGrid(client_app, cfg.federation.num_clients, cfg.flat())
    record = execute(cfg, grid)
    walk = compat.private("inflatable.get_all_nested_objects")  # Flower's own object walk, as its grids push

    def serialised(msg: Message) -> int:
        return sum(len(obj.deflate()) for obj in walk(msg).values())

    up, down = _history_bytes(record)
    assert down == sum(serialised(m) for m in grid.sent)
    assert up == sum(serialised(r) for r in grid.received if not r.has_error())
    steps = [m for m in grid.sent if wire.GRAD_KEY in m.content]
    assert steps
    for msg in steps:
        grad = msg.content[wire.GRAD_KEY]
        assert sorted(grad.keys()) == ["codes", "meta", "scales"]
        codes, scales = grad["codes"].numpy(), grad["scales"].numpy()
        assert codes.ndim == 2 and scales.shape == codes.shape[:1]  # the real tokens' rows only
        payload = codes.nbytes + scales.nbytes + 8
        assert payload <= message_nbytes(msg) == serialised(msg) <= payload + 2500  # + Flower's framing
    acts = [r.content["acts"] for r in grid.received if not r.has_error() and "acts" in r.content]
    assert acts and all(a["codes"].numpy().ndim == 2 for a in acts)


def test_eight_bits_both_ways_cut_the_bytes_and_a_tiny_split_run_still_learns(tiny_flat, tmp_path):
    """The issue's figure: bytes per client-round of the cut, fp32 dense against 8-bit trimmed (printed)."""
    base = {**tiny_flat, "federation.rounds": 3}
    runs = {  # simulations/bench_cut_wire.py prints the other settings too
        "fp32 dense": {"split.trim-padding": False},
        "8-bit trimmed": {"split.grad-bits": 8, "privacy.quantize-bits": 8},
    }
    out = {}
    for name, extra in runs.items():
        rec = run_in_process(build_config({**base, **extra, "output.dir": str(tmp_path / name.replace(" ", "-"))}))
        out[name] = rec
        c = rec["cost"]
        print(f"{name:14s} up {c['bytes_up_per_client_round']:10.0f}  down {c['bytes_down_per_client_round']:10.0f}  "
              f"losses {[round(h['train_loss'], 4) for h in rec['history']]}  utility {rec['utility']['value']}")
    eight = [h["train_loss"] for h in out["8-bit trimmed"]["history"]]
    fp32 = [h["train_loss"] for h in out["fp32 dense"]["history"]]
    assert eight[-1] < eight[0] - 0.05, eight  # it learns
    np.testing.assert_allclose(eight, fp32, atol=0.02)  # as the fp32 run does
    dense, q8 = out["fp32 dense"]["cost"], out["8-bit trimmed"]["cost"]
    assert q8["bytes_up_per_client_round"] < 0.5 * dense["bytes_up_per_client_round"]
    assert q8["bytes_down_per_client_round"] < 0.5 * dense["bytes_down_per_client_round"]


# ------------------------------------------------------------------ after the noise: post-processing of the release


def test_quantization_and_trimming_are_applied_to_the_noised_release():
    """What leaves is a function of the noised release alone (plus rounding randomness): the noise comes first.

    Same seed and step, so the same d_chi draw: the quantized, trimmed release equals quantizing and
    trimming the unquantized noised release. Quantizing before the noise would leave the sent
    values off every code grid of the noised ones, and this equality would fail.
    """
    from guardedtuning.privacy.mechanisms import DChiMechanism

    h = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ids = torch.zeros(2, 5, dtype=torch.long)
    mech = DChiMechanism(eta=5.0, clip=1.0)
    noised = ClientPrivacy(seed=9, mechanism=mech, knobs=PrivacyConfig(mechanism="dchi", eta=5.0)).release(
        h, mask, input_ids=ids, step=4)["h"]
    assert not torch.allclose(noised, h, atol=0.1)  # the noise is there
    for stochastic in (False, True):
        priv = ClientPrivacy(seed=9, mechanism=mech, knobs=PrivacyConfig(mechanism="dchi", eta=5.0, quantize_bits=8),
                             stochastic_rounding=stochastic)
        out = priv.release(h, mask, input_ids=ids, step=4)
        record = wire.acts_record({**out, "labels": torch.zeros(2, dtype=torch.long)}, trim=True)
        sent = torch.from_numpy(record["codes"].numpy().astype(np.int16) - 128) * torch.from_numpy(
            record["scales"].numpy())[:, None]  # (N, D): what the server reads
        rows = noised[mask.bool()]
        step = rows.abs().amax(-1, keepdim=True) / 127
        assert sent.shape == rows.shape
        assert bool(((sent - rows).abs() <= (1.0 if stochastic else 0.5) * step * (1 + 1e-5)).all())
        if not stochastic:
            expect = quantize_activations(rows, bits=8)
            assert np.array_equal(record["codes"].numpy(), expect.codes)
            assert np.array_equal(record["scales"].numpy(), expect.scales)
