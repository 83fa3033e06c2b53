"""Prompt retries when a reply's content is still uploading (Flower's deployment engine).

On the deployment engine a SuperNode sends a reply in two parts: the message (its object
tree), then the objects' contents. The SuperLink hands the message to the ServerApp as
soon as the first part is in, and when the ServerApp's grid then finds an object not yet
uploaded, it retries after 1 s, doubling up to 10 s (``pull_objects``, flwr 1.41/1.42).
With our own pull loop (``comm.poll-interval``), replies are usually pulled within
milliseconds of the first part, so about two of every three split steps lost a whole
second to that first retry (26 of 36 replies in a 2-client run, measured).

:func:`install` makes the HTTP grid's object pulls retry after ``initial`` seconds,
doubling up to ``cap`` (0.1 s) instead of 10 s, so a step waits for the upload plus at
most a tenth of a second, not for a fixed second. Flower's 500-try limit goes (it would
end a slow upload after under a minute at this cap); Flower's time limit (2 h) stays.
With at most two objects pulled at once, a pending upload costs at most 20 requests per
second. Only the deployment engine's grid uses this path; simulations are unaffected.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import version
from typing import Any

SUPPORTED = ("1.41.", "1.42.")


CAP_S = 0.1


def prompt_pull_objects(pull_objects: Any, initial: float, cap: float = CAP_S) -> Any:
    """``pull_objects`` retrying after ``initial`` seconds, doubling up to ``cap`` (unless given)."""

    def pull(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", initial)
        kwargs.setdefault("backoff_cap", max(initial, cap))
        kwargs.setdefault("max_tries_per_object", None)  # Flower's max_time still bounds the wait
        return pull_objects(*args, **kwargs)

    pull.guardedtuning_initial = initial  # type: ignore[attr-defined]
    pull.guardedtuning_wrapped = pull_objects  # type: ignore[attr-defined]
    return pull


def install(initial: float) -> str:
    """Use prompt retries in the ServerApp's HTTP grid; return what happened."""
    flwr_version = version("flwr")
    if not flwr_version.startswith(SUPPORTED):
        return f"flower (not patched for flwr {flwr_version})"
    try:
        module = import_module("flwr.superlink.grid.http_grid")
    except ImportError:
        return "flower (HTTP grid not found)"
    current = getattr(module, "pull_objects", None)
    if current is None:
        return "flower (the HTTP grid does not pull objects the way this patch knows)"
    current = getattr(current, "guardedtuning_wrapped", current)
    module.pull_objects = prompt_pull_objects(current, initial)
    return f"retries after {initial * 1000:g} ms, doubling up to {max(initial, CAP_S) * 1000:g} ms"
