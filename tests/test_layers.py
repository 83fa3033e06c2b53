"""The package's shape: layered imports, recipe names only in the registry, thin handlers.

These read the source (ast), so they are fast and fail on the change that breaks the shape.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "guardedtuning"

# Lowest first: a module may import from its own rank or below, never above.
RANKS = {
    "errors": 0, "config": 1, "compat": 1, "resources": 1,
    "models": 2, "data": 2,
    "training": 3, "evaluation": 3,
    "privacy": 4, "codecs": 4, "wire": 4,
    "recipes": 5,
    "results": 6,
    "strategies": 7,
    "clients": 8, "server_app": 8, "preflight": 8,
    "launcher": 9, "inprocess": 9,
    "bench": 10, "deploy": 10, "trilemma": 10,
    "cli": 11,
}
# Same rank, but neither side may import the other: the wire modules are their contract.
APART = {("clients", "server_app"), ("server_app", "clients")}


def _part(module: str) -> str:
    """``guardedtuning.server_app.engine`` -> ``server_app``; ``guardedtuning.cli`` -> ``cli``."""
    return module.split(".")[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported guardedtuning module) for every import in ``path``, function-level ones included."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("guardedtuning."):
                out.append((node.lineno, node.module))
            elif node.module == "guardedtuning":
                out += [(node.lineno, f"guardedtuning.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("guardedtuning.")]
    return out


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name != "guardedtuning":
            out.append((name, path))
    return out


def test_every_part_of_the_package_has_a_rank():
    parts = {_part(name) for name, _ in _modules()}
    assert parts <= set(RANKS), f"give these parts a rank in RANKS: {sorted(parts - set(RANKS))}"


def test_no_upward_imports():
    bad = []
    for name, path in _modules():
        me = _part(name)
        for line, target in _imports(path):
            them = _part(target)
            if RANKS[them] > RANKS[me] or (me, them) in APART:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({me}) imports {target} ({them})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


RECIPE_NAMES = ("split", "privtune", "guarded", "fedlora", "central-ft", "gradfree", "offsite")
COMPARISON = re.compile(r"""recipe\w*\s*(==|!=|\bin\b|\bnot in\b)\s*[\("']""")


def test_recipe_names_are_compared_only_in_the_registry():
    from guardedtuning import recipes

    assert set(recipes.names()) == set(RECIPE_NAMES)
    bad = []
    for name, path in _modules():
        if _part(name) == "recipes":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if COMPARISON.search(line.split("#")[0]):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not bad, "recipe-name comparisons outside guardedtuning/recipes:\n" + "\n".join(bad)


def _body_lines(fn) -> int:  # type: ignore[no-untyped-def]
    """Lines of a function's code, without its docstring, comments and blank lines."""
    src = inspect.getsource(fn)
    tree = ast.parse(src.lstrip() if src.startswith((" ", "\t")) else src)
    func = tree.body[0]
    assert isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    lines = ast.unparse(ast.Module(body=body, type_ignores=[])).splitlines()
    return len([ln for ln in lines if ln.strip()])


def test_every_client_handler_is_thin():
    from guardedtuning.recipes import message_handlers

    handlers = message_handlers()
    assert {"train", "train.split", "train.gradfree", "train.offsite"} <= set(handlers)
    fat = {mtype: _body_lines(fn) for mtype, fn in handlers.items() if _body_lines(fn) > 15}
    assert not fat, f"handlers over 15 lines (unpack -> plain function -> pack): {fat}"


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_each_recipe_builds_and_validates_its_own_config(name):
    from guardedtuning import recipes
    from guardedtuning.recipes.base import resolve

    cfg = recipes.config_for(name)
    assert cfg.recipe == name
    recipe = recipes.get(name)
    recipe.validate(cfg)
    assert callable(resolve(recipe.driver))
    assert all(callable(resolve(path)) for path in recipe.handlers.values())
