"""The SmolLM2 weights check of ``simulations/smollm2_instruct.py`` (a float64 probe with token ids).

The device's float32 probe once looked 0.49 away on bit-identical weights: the float32 sum of
49,152 logits adds up per-logit kernel differences of ~2e-5. The check compares each logit and
the float64 sum with their own tolerances, and the token ids.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("smollm2_instruct", REPO / "simulations" / "smollm2_instruct.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REF = json.loads((REPO / "simulations" / "smollm2_logits.json").read_text())


def _probe(**change):
    out = {"dtype": "float64", "token_ids": list(REF["token_ids"]), "logits": list(REF["logits"])}
    out.update(change)
    return out


def test_the_reference_is_a_float64_probe_with_token_ids():
    assert REF["dtype"] == "float64" and REF["token_ids"] == [504, 3575, 282, 4649, 314]
    assert len(REF["logits"]) == 66 and REF["logits"][65] == 7042.0


def test_kernel_rounding_passes_and_a_changed_weight_or_tokenizer_fails():
    check = _module().check_logits
    path = str(REPO / "simulations" / "smollm2_logits.json")
    assert check(path, _probe()) is None
    rounded = [x + 2e-5 for x in REF["logits"][:64]] + [REF["logits"][64] + 1e-3, REF["logits"][65]]
    assert check(path, _probe(logits=rounded)) is None  # what two torch builds differ by
    moved = list(REF["logits"])
    moved[3] += 0.01
    assert "max |logit diff| 0.01" in check(path, _probe(logits=moved))
    assert "token ids differ" in check(path, _probe(token_ids=[1, *REF["token_ids"]]))
    other = list(REF["logits"])
    other[65] = 7043.0
    assert "argmax 7043 vs 7042" in check(path, _probe(logits=other))


def test_an_old_float32_probe_file_is_refused_with_the_fix(tmp_path):
    old = tmp_path / "logits.json"
    old.write_text(json.dumps({"model": "smollm2-135m", "logits": REF["logits"]}))
    msg = _module().check_logits(str(old), _probe())
    assert msg is not None and "--save-logits" in msg


def test_a_float64_sum_moved_by_the_old_probe_s_gap_fails():
    path = str(REPO / "simulations" / "smollm2_logits.json")
    logits = list(REF["logits"])
    logits[64] += 0.49  # in float64 the two machines' sums agree to 1e-11: this is no rounding
    assert "sum" in _module().check_logits(path, _probe(logits=logits))
