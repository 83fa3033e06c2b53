"""Prompt retries when a reply's content is still uploading (Flower's deployment engine).

On the deployment engine a SuperNode sends a reply in two parts: the message (its object
tree), then the objects' contents. The SuperLink hands the message to the ServerApp as
soon as the first part is in, and when the ServerApp's grid then finds an object not yet
uploaded, it retries after 1 s, doubling up to 10 s (``pull_objects``, flwr 1.41/1.42).
With our own pull loop (``comm.poll-interval``), replies are usually pulled within
milliseconds of the first part, so about two of every three split steps lost a whole
second to that first retry (26 of 36 replies in a 2-client run, measured).

:func:`install` makes the HTTP grid's object pulls retry after ``initial`` seconds,
doubling up to :data:`~guardedtuning.compat.PULL_CAP_S` (0.1 s) instead of 10 s, so a
step waits for the upload plus at most a tenth of a second, not for a fixed second.
Flower's 500-try limit goes (it would end a slow upload after under a minute at this
cap); Flower's time limit (2 h) stays. With at most two objects pulled at once, a pending
upload costs at most 20 requests per second. Only the deployment engine's grid uses this
path; simulations are unaffected. The patch itself is :func:`guardedtuning.compat.
prompt_pull_objects`, shared with the warm SuperNode; with the compatibility gate off
nothing is patched and the status is ``"flower (<why>)"``.
"""

from __future__ import annotations

from guardedtuning import compat

HTTP_GRID_PULLS = "http_grid.pull_objects"  # compat.FLOWER_PRIVATE name of the grid's pull_objects


def install(initial: float) -> str:
    """Use prompt retries in the ServerApp's HTTP grid; return what happened, for the log."""
    return compat.install_prompt_pulls(HTTP_GRID_PULLS, initial)
