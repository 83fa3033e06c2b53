"""The package declares what it imports, and the transformers calls it makes are current."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def _third_party_imports(package: Path) -> dict[str, str]:
    """Top-level module names imported anywhere under ``package`` -> one file that imports it."""
    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "guardedtuning":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_imported_distribution_is_declared():
    dists = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module, where in _third_party_imports(ROOT / "guardedtuning").items():
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} (imported in {where}; distribution {sorted(names)})")
    assert not missing, f"imported but not in pyproject's [project] dependencies: {missing}"


def test_the_import_scan_sees_the_direct_imports():
    # guards the test above against scanning nothing
    found = _third_party_imports(ROOT / "guardedtuning")
    assert {"torch", "flwr", "cryptography", "scipy", "safetensors", "transformers"} <= found.keys()


def test_decoder_split_calls_transformers_without_deprecated_arguments():
    from guardedtuning.models.loading import load_backbone
    from guardedtuning.models.split import Bottom, Top

    backbone = load_backbone("tiny-llama")
    bottom, top = Bottom(backbone, 2), Top(backbone, 2, num_labels=2)
    ids = torch.randint(5, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated keyword (e.g. `past_key_values`) raises here
        logits = top.logits(bottom(ids, mask), mask)
    assert logits.shape == (2, 8, backbone.config.vocab_size)
    assert torch.isfinite(logits).all()
