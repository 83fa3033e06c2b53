"""Bad input ends in one line naming the fix, a non-zero exit code and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "guardedtuning.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--recipe", "nope"], "unknown recipe 'nope'; available recipes: central-ft, fedlora, "),
        (["--set", "model.name=./no/such/folder"], "is not a folder; pass an existing model folder"),
        (["--set", "split.layer=9"], "`split.layer` is 9 but 'minilm-l6' has 6 blocks; pass --set split.layer=K"),
        (["--set", "data.train-size=5"], "federation.num-clients is 10 but dataset 'sentiment' has only 5 training rows"),
        (["--set", "federation.roundz=2"], "unknown run-config key `federation.roundz`; did you mean federation.rounds"),
        (["--set", "train.lr=-1"], "`train.lr` must be a positive number but is -1.0"),
        (["--set", "lora.alpha=nan"], "`lora.alpha` must be a finite number but is 'nan'"),
        (["--set", "seed=-1"], "`seed` must be an integer >= 0 but is -1"),
        (["--set", "data.partition=[/]"], "`data.partition` must be `iid` or `dirichlet` but is '[/]'"),
        (["--set", "model.max-length=600"], "`model.max-length` is 600 but 'minilm-l6' has 512 positions"),
        (["--set", "data.partition=dirichlet", "--set", "data.alpha=0.01", "--set", "federation.num-clients=30",
          "--set", "data.train-size=300"], "cannot split 'sentiment' into 30 dirichlet partitions"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, needle):
    res = _cli("run", "--out", str(tmp_path / "o"), *args)
    assert res.returncode == 2, res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    assert needle in lines[0] and "Traceback" not in res.stderr


def test_dataset_without_the_text_field(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"body": [f"t{i}" for i in range(50)], "label": [0, 1] * 25}).to_csv(path, index=False)
    res = _cli("run", "--out", str(tmp_path / "o"), "--set", f"data.name={path}", "--set", "data.test-size=5")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "has no column 'text' (columns: body, label); pass --set data.text-field=<column>" in res.stderr


def test_model_folder_without_model_type(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    res = _cli("run", "--out", str(tmp_path / "o"), "--set", f"model.name={tmp_path / 'm'}")
    assert res.returncode == 2 and "Traceback" not in res.stderr and "cannot load model" in res.stderr


def test_dataset_without_the_label_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "stars": i % 2}) for i in range(50)))
    res = _cli("run", "--out", str(tmp_path / "o"), "--set", f"data.name={path}", "--set", "data.test-size=5")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "has no column 'label' (columns: text, stars); pass --set data.label-field=<column>" in res.stderr


def test_keys_lists_every_key():
    res = _cli("keys")
    assert res.returncode == 0 and "federation.clients-per-round" in res.stdout and "split.layer" in res.stdout
