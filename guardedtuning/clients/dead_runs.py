"""The warm SuperNode's cleanup after a run stops while one of its messages is being received.

Flower's ``_pull_and_store_message`` (flwr 1.41/1.42) creates a message's ClientApp task and
stores the message before it pulls the message's content. When the SuperLink answers that
content pull with "run not running" (``RunNotRunningException``, which Flower's retry layer
raises for any PERMISSION_DENIED; e.g. the run's ServerApp died), it logs "Ignoring message"
and returns None, but leaves the task pending and the message stored, without content.
Flower's stock SuperNode starts a process per task, so there the orphan costs a process; the
warm runner (:mod:`guardedtuning.clients.warm_node`) runs one task at a time and would wait on
the orphan's content (Flower's pull waits up to 2 h) while every later message, a resumed
run's included, queued behind it.

:func:`discard_orphan` finishes exactly the task that pull created and deletes exactly the
message it received (and its objects), whether or not the runner already acquired the task
and pulled the message; other messages of the same run are left as they are. The runner
holding such a task then finds its token revoked (HTTP 401, :func:`token_refused`); that,
and no other failure of a task's output push (:class:`PushRecorder` sees the ones Flower's
``push_task_output`` only logs), is let pass.
"""

from __future__ import annotations

import logging
from typing import Any

from guardedtuning import compat
from guardedtuning.compat import private as flower

log = logging.getLogger("guardedtuning.node")

DISCARDED = ("its run is not RUNNING any more (its ServerApp stopped) while the SuperNode received the message; "
             "discarded by guardedtuning's warm SuperNode")
"""The details of a task :func:`discard_orphan` finished (Flower's ``TaskStatus.details``)."""


def known_state(state: Any) -> bool:
    """Whether ``state`` has every NodeState method the cleanup calls (:data:`compat.NODESTATE_METHODS`)."""
    return state is not None and all(callable(getattr(state, m, None)) for m in compat.NODESTATE_METHODS)


def unfinished_tasks(state: Any) -> set[int] | None:
    """IDs of the SuperNode's tasks that have not finished (None when ``state`` is not a NodeState we know).

    Filtered by status in Flower's store: finished tasks (one per message handled) are not copied out.
    """
    if not known_state(state):
        return None
    status = flower("Status")
    return {t.task_id for t in state.get_tasks(statuses=[status.PENDING, status.STARTING, status.RUNNING])}


def discard_orphan(state: Any, object_store: Any, before: set[int], message: Any) -> list[int]:
    """Finish the task a failed pull of ``message`` left unfinished, and delete ``message`` and its objects.

    Parameters
    ----------
    state : flwr.supernode.nodestate.NodeState
        The SuperNode's state.
    object_store : flwr.supercore.object_store.ObjectStore or None
        Where the message's objects are (None: none to delete).
    before : set of int
        The unfinished tasks before the pull (:func:`unfinished_tasks`): only a task of the
        message's run created by this pull is finished.
    message : flwr.app.Message
        The message the pull received and did not hand to a task (it returned None).

    Returns
    -------
    list of int
        The IDs of the tasks finished (as failed).
    """
    run_id, message_id = message.metadata.run_id, message.metadata.message_id
    new = (unfinished_tasks(state) or set()) - before
    orphans = [t.task_id for t in state.get_tasks(task_ids=sorted(new)) if t.run_id == run_id] if new else []
    for task_id in orphans:
        state.finish_task(task_id, sub_status=flower("SubStatus").FAILED, details=DISCARDED)
    # deleted by id: get_messages_legacy would skip it once the runner pulled it (is_retrieved)
    state.delete_messages(message_ids=[message_id])
    if object_store is not None:
        object_store.delete(message_id)
    if orphans:
        log.warning("discarded task(s) %s and message %s of run %s, which stopped while the message was being "
                    "received", ", ".join(map(str, orphans)), message_id, run_id)
    return orphans


# the runner's side: a discarded task's refused token, and nothing else, is let pass


class PushRecorder:
    """A Runtime API client that keeps the error of its ``PushTaskOutput`` (Flower's caller swallows it)."""

    def __init__(self, client: Any) -> None:
        self.client, self.error = client, None

    def PushTaskOutput(self, request: Any) -> Any:  # noqa: N802 - Flower's name
        try:
            return self.client.PushTaskOutput(request)
        except Exception as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def token_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is the Runtime API refusing a task's token (HTTP 401: the task is finished, its token revoked).

    What the runner gets for a task the SuperNode's dead-run cleanup finished
    (:func:`discard_orphan`) while the runner held it. Flower's HTTP client raises it as
    ``httpx.HTTPStatusError``; read by its attributes (``response.status_code``), not by
    importing httpx, which is Flower's dependency and not one of ours.
    """
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return type(exc).__name__ == "HTTPStatusError" and status == 401
