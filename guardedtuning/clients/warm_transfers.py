"""The warm SuperNode's changes to Flower's SuperNode loop: its polls, its object transfers, its early wake.

Installed by :func:`patch_supernode_polling` in the SuperNode process
(:mod:`guardedtuning.clients.warm_node` calls it before it starts Flower's
``flower-supernode``), every Flower function reached and replaced through
:mod:`guardedtuning.compat`:

- the loop's fixed sleeps become a :class:`Backoff` (:class:`_SupernodeClock`);
- a message's objects are pulled and pushed up to ``--object-concurrency`` at once
  (:func:`~guardedtuning.compat.prompt_pull_objects`,
  :func:`~guardedtuning.compat.concurrent_push_objects`), objects still uploading retried
  as Flower retries them;
- with ``--early-wake on`` (opt-in; off by default) the runner is woken when a message's
  objects are stored, before the receipt is confirmed; a reply to a message whose
  confirmation then failed is dropped (:func:`drop_replies`), also at send time
  (:func:`_refusing_push_messages`), whenever it was stored;
- a task that a dead run's failed pull leaves behind is finished
  (:mod:`guardedtuning.clients.dead_runs`).
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections import deque
from typing import Any

from guardedtuning import compat
from guardedtuning.clients.dead_runs import discard_orphan, unfinished_tasks
from guardedtuning.compat import private as flower

log = logging.getLogger("guardedtuning.node")


class Backoff:
    """Waits that start short after activity and grow while nothing happens.

    ``next()`` returns the wait before the next poll: ``start``, then ``start * growth``,
    and so on up to ``limit``; ``reset()`` starts over (a message arrived). Something
    that arrives ``t`` seconds into a run of empty polls is picked up less than
    ``(growth - 1) * t + start`` late (a tenth of the wait, with the default 1.1), and an
    idle poller reaches ``limit`` within a few dozen polls.
    """

    def __init__(self, *, start: float, limit: float, growth: float = 1.1) -> None:
        if not 0 < start <= limit:
            raise ValueError(f"poll start {start} must be > 0 and <= the limit {limit}")
        if growth < 1:
            raise ValueError(f"poll growth {growth} must be >= 1")
        self.start, self.limit, self.growth = start, limit, growth
        self.current = start

    def next(self) -> float:
        wait = self.current
        self.current = min(self.current * self.growth, self.limit)
        return wait

    def reset(self) -> None:
        self.current = self.start


class _SupernodeClock:
    """Stands in for the ``time`` module inside ``flwr.supernode.start_client_internal``.

    That module sleeps 3 s after an empty poll of the SuperLink and 0.5 s between checks
    for the ClientApp's reply; those are the only sleeps it makes. Long sleeps (>= 1 s)
    become the backoff's waits, short ones at most ``reply_poll``.
    """

    def __init__(self, backoff: Backoff, reply_poll: float) -> None:
        self.backoff, self.reply_poll = backoff, reply_poll

    def sleep(self, seconds: float) -> None:
        if seconds >= 1.0:
            time.sleep(min(seconds, self.backoff.next()))
        else:
            time.sleep(min(seconds, self.reply_poll))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def patch_supernode_polling(backoff: Backoff, *, reply_poll: float, wakeup_fd: int | None = None,
                            object_concurrency: int | None = None, wake_before_confirm: bool = False) -> str:
    """Install the backoff in Flower's SuperNode loop; return what happened.

    Parameters
    ----------
    backoff : Backoff
        The waits between polls of the SuperLink (reset when a message arrives).
    reply_poll : float
        Seconds between checks for the ClientApp's reply.
    wakeup_fd : int, optional
        The write end of a pipe that gets a byte whenever a message was pulled and stored,
        so that the runner acquires its task at once instead of at its next poll.
    object_concurrency : int, optional
        How many objects of a message are pulled from / pushed to the SuperLink at once
        (:data:`~guardedtuning.compat.OBJECT_CONCURRENCY`); None keeps Flower's
        ``min(2, CPU cores)``. Each round of transfers is a round trip over the link.
    wake_before_confirm : bool
        Wake the runner as soon as the message's objects are stored, before Flower's
        loop confirms the receipt to the SuperLink (one more round trip), so the
        ClientApp computes while the confirmation travels. False (the default): after
        it, as Flower orders it. Its gain was below the noise in every measurement
        (docs/deployment.md), and its failure path is where a reply could be released
        uncounted; with it on, Flower's ``_push_messages`` is wrapped too, so that a
        reply to a message whose receipt failed is deleted, never sent.
    """
    g = compat.gate()
    if not g.enabled:
        return g.stock
    try:
        pull = flower("supernode_loop.pull_and_store_message")
        loop_time = flower("supernode_loop.time")
        loop_pulls = flower("supernode_loop.pull_objects")
        loop_push = flower("supernode_loop.push_messages") if wake_before_confirm else None
    except compat.FlowerCompatError:
        return "flower (the SuperNode loop is not the one this patch knows)"
    if getattr(pull, "guardedtuning_backoff", None) is not None:
        return "fast (already installed)"
    if loop_time is not time:
        return "flower (the SuperNode loop is not the one this patch knows)"

    try:
        signature = inspect.signature(pull)
        missing = {"state", "object_store", "receive"} - set(signature.parameters)
    except (TypeError, ValueError):  # not introspectable
        missing = {"state", "object_store", "receive"}
    if missing:
        return (f"flower (the SuperNode loop's pull has another signature: no {', '.join(sorted(missing))}; "
                "its dead-run cleanup needs them)")

    if wake_before_confirm and "confirm_message_received" not in signature.parameters:
        return ("flower (the SuperNode loop's pull has another signature: no confirm_message_received; "
                "pass --early-wake off)")
    if wake_before_confirm:
        try:
            push_missing = {"state", "object_store", "send"} - set(inspect.signature(loop_push).parameters)
        except (TypeError, ValueError):
            push_missing = {"state", "object_store", "send"}
        if push_missing:
            return (f"flower (the SuperNode loop's push has another signature: no {', '.join(sorted(push_missing))}; "
                    "pass --early-wake off)")

    def wake() -> None:
        if wakeup_fd is not None:
            try:
                os.write(wakeup_fd, b"m")
            except (BlockingIOError, BrokenPipeError):
                pass  # a wakeup is already pending, or the runner is gone

    refused: deque[str] = deque(maxlen=64)  # messages whose receipt failed after the runner was woken

    def pull_and_reset(*args: Any, **kwargs: Any) -> int | None:
        bound = signature.bind(*args, **kwargs)
        state, receive = bound.arguments["state"], bound.arguments["receive"]
        received: list[Any] = []
        woken: list[bool] = []

        def receive_and_note() -> Any:
            got = receive()
            if got is not None:
                received.append(got[0])
            return got

        bound.arguments["receive"] = receive_and_note
        if wake_before_confirm:
            confirm = bound.arguments["confirm_message_received"]

            def wake_then_confirm(*c_args: Any, **c_kwargs: Any) -> Any:
                # Flower calls this after every object of the message is in the store and
                # its task exists: the runner may acquire it now. If the confirmation then
                # fails, Flower deletes the message and finishes its task as failed (its
                # token is refused from then on), but a reply the runner pushed before
                # stays in the state, and Flower's loop would send it with the next
                # message's push: it is dropped below (drop_replies).
                backoff.reset()
                wake()
                woken.append(True)
                return confirm(*c_args, **c_kwargs)

            bound.arguments["confirm_message_received"] = wake_then_confirm
        before = unfinished_tasks(state)
        run_id = pull(*bound.args, **bound.kwargs)
        if run_id is None and woken and received:  # the confirmation failed after the runner was woken
            refused.append(received[0].metadata.message_id)
        if refused:  # also a reply stored after the failure (its push authenticated before it)
            drop_replies(state, bound.arguments.get("object_store"), refused)
        if run_id is None and received and before is not None:
            try:
                discard_orphan(state, bound.arguments.get("object_store"), before, received[0])
            except Exception:  # noqa: BLE001 - the SuperNode keeps serving; the orphan is logged
                log.exception("could not discard the task of message %s (its run stopped while it was received)",
                              received[0].metadata.message_id)
        if run_id is not None:
            backoff.reset()
            log.debug("message stored at %.3f", time.time())
            if not woken:
                wake()
        return run_id

    pull_and_reset.guardedtuning_backoff = backoff  # type: ignore[attr-defined]
    compat.replace("supernode_loop.pull_and_store_message", pull_and_reset)
    if wake_before_confirm:
        compat.replace("supernode_loop.push_messages", _refusing_push_messages(loop_push, refused))
    compat.replace("supernode_loop.time", _SupernodeClock(backoff, reply_poll))
    # a message's content is uploaded after the message: retry its pull promptly, not after 1 s
    transfers = "objects 2 at a time (Flower's)"
    if object_concurrency is not None:
        try:
            loop_push = flower("supernode_loop.push_object_contents_from_iterable")
            flower("inflatable.get_num_workers")
        except compat.FlowerCompatError:
            object_concurrency = None
            transfers = "objects as Flower moves them (its push/worker functions are not the ones this patch knows)"
        else:
            compat.replace("inflatable.get_num_workers", compat.uncapped_num_workers)
            compat.replace("supernode_loop.push_object_contents_from_iterable", compat.concurrent_push_objects(
                getattr(loop_push, "guardedtuning_wrapped", loop_push), object_concurrency))
            transfers = f"up to {object_concurrency} objects at once"
    compat.replace("supernode_loop.pull_objects",
                   compat.prompt_pull_objects(getattr(loop_pulls, "guardedtuning_wrapped", loop_pulls),
                                              backoff.start, concurrency=object_concurrency))
    return (f"fast (polls from {backoff.start * 1000:g} ms up to {backoff.limit:g} s; {transfers}; runner woken "
            f"{'before' if wake_before_confirm else 'after'} the receipt is confirmed)")


class RefusedReply(Exception):
    """A reply to a message whose receipt failed after the runner was woken: never sent."""


def _refusing_push_messages(push_messages: Any, refused: deque[str]) -> Any:
    """Flower's ``_push_messages`` that deletes, never sends, a reply to a message in ``refused``.

    :func:`drop_replies` after each pull misses a reply whose push the Runtime API
    authenticated before the receipt failed but stored only after the next pull; Flower's
    loop sends every reply it finds. Here the check is at send time: the loop's ``send``
    raises :class:`RefusedReply` for such a reply, before anything goes over the link, and
    Flower's own ``finally`` deletes the message and its objects. Replies already waiting are
    dropped first, so that Flower's wait for a reply is not satisfied by one of them.
    """
    signature = inspect.signature(push_messages)

    def push(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        state, send = bound.arguments["state"], bound.arguments["send"]
        if refused:
            drop_replies(state, bound.arguments.get("object_store"), refused)

        def refusing_send(message: Any, *s_args: Any, **s_kwargs: Any) -> Any:
            reply_to = getattr(message.metadata, "reply_to_message_id", "")
            if reply_to in refused:
                log.warning("dropped the reply %s: its message %s's receipt failed after the ClientApp started "
                            "(Flower failed the task); the ServerApp gets no reply to it",
                            message.metadata.message_id, reply_to)
                raise RefusedReply(f"reply to message {reply_to}, whose receipt failed: not sent")
            return send(message, *s_args, **s_kwargs)

        bound.arguments["send"] = refusing_send
        return push_messages(*bound.args, **bound.kwargs)

    push.guardedtuning_wrapped = push_messages  # type: ignore[attr-defined]
    return push


def drop_replies(state: Any, object_store: Any, refused: deque[str] | set[str]) -> list[str]:
    """Delete the replies waiting in ``state`` to the messages in ``refused``; return their ids.

    ``refused`` holds messages whose receipt Flower's loop marked failed after the runner was
    woken (``--early-wake``): Flower deleted each message and failed its task, so none of
    them gets a reply to the SuperLink. A reply the runner pushed before would otherwise be
    sent with the next message's (one message late, and every later reply with it). The
    SuperLink delivers a message once (it marks it delivered when pulled, flwr 1.41/1.42), so
    no later message has an id in ``refused``. Read
    from ``state``'s message store (:data:`~guardedtuning.compat.NODESTATE_MESSAGES`) so that
    no other message is marked retrieved; a NodeState without one is left as it is (logged).
    """
    store = getattr(state, compat.NODESTATE_MESSAGES, None)
    if not isinstance(store, dict):
        log.error("cannot look for replies to messages %s (their receipt failed): the SuperNode's state has no %s; "
                  "pass --early-wake off", ", ".join(refused), compat.NODESTATE_MESSAGES)
        return []
    gone = [mid for mid, entry in list(store.items())
            if getattr(entry.message.metadata, "reply_to_message_id", "") in refused]
    if gone:
        state.delete_messages(message_ids=gone)
        for mid in gone:
            if object_store is not None:
                object_store.delete(mid)
        log.warning("dropped the reply %s: its message's receipt failed after the ClientApp started "
                    "(Flower failed the task); the ServerApp gets no reply to it", ", ".join(gone))
    return gone
