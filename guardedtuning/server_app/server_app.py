"""The ServerApp: build the config once, run the recipe's driver (from the registry), write the record."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from guardedtuning import recipes
from guardedtuning.config import RunConfig
from guardedtuning.errors import BudgetSpent, GuardedTuningError
from guardedtuning.evaluation import utility_metric
from guardedtuning.models.loading import kind_of
from guardedtuning.preflight import preflight
from guardedtuning.results import Recorder
from guardedtuning.server_app.common import ServerRun, log
from guardedtuning.server_app.dispatch import install as install_dispatch
from guardedtuning.server_app.object_pulls import install as install_object_pulls
from guardedtuning.server_app.stopping import stop_for_budget

app = ServerApp()


def execute(cfg: RunConfig, grid: Grid | None, *, dispatch: str | None = None) -> dict:
    """Run one recipe end to end and return its results record."""
    recipe = recipes.get(cfg.recipe)
    rec = Recorder(cfg, Path(cfg.output.dir), model=cfg.model.name, dataset=cfg.data.name, recipe=recipe)
    rec.dispatch = dispatch
    try:
        run = ServerRun.create(cfg, rec)
        rec.majority_rate = run.task.majority_rate()
        rec.event("start", recipe=cfg.recipe, rounds=cfg.federation.rounds, steps=cfg.train.local_steps,
                  majority_rate=run.task.majority_rate())
        if recipe.federated and grid is None:
            raise GuardedTuningError(f"recipe {cfg.recipe!r} is federated; run it with `guardedtuning run` or `flwr run .`")
        try:  # a driver on engine.run_rounds stops there (after its design's finish()); this catches the others
            metrics = recipe.run(grid, run)
        except BudgetSpent as exc:
            if not rec.history:  # not one round fit the budget: the plan itself is wrong
                raise
            metrics = stop_for_budget(rec, exc)
        if not metrics and rec.history:  # resumed after the last round: nothing left to run
            metrics = {"utility": rec.history[-1]["utility"]}
        kind = kind_of(cfg.model.name)
        return rec.finish(metric=utility_metric(kind), utility=metrics.get("utility"))
    except GuardedTuningError as exc:
        rec.event("error", message=str(exc), input=True)
        raise
    except Exception as exc:
        rec.event("error", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise


@app.main()
def main(grid: Grid, context: Context) -> None:
    if not log.handlers:  # our lines in Flower's streamed log, without everyone else's INFO
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("guardedtuning: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    cfg = recipes.build_config(context.run_config)
    dispatch = install_dispatch(cfg.sim.dispatch_interval)  # before the engine's dispatcher thread starts
    preflight(cfg)  # `flwr run .` skips guardedtuning's launcher: bad input fails here, before any round
    log.info("deployment engine object pulls: %s", install_object_pulls(cfg.comm.poll_interval))
    log.info("recipe %s, output %s, simulation dispatch: %s", cfg.recipe, Path(cfg.output.dir).resolve(), dispatch)
    record = execute(cfg, grid, dispatch=dispatch)
    log.info("%s = %s; results in %s", record["utility"]["metric"], record["utility"]["value"],
             Path(cfg.output.dir).resolve() / "results.json")
