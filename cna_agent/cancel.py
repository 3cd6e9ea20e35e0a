"""What a CancelOperation reaches: the operation's cancel scope, seen by its coroutine and by
the threads and processes that do its work.

Why a scope and not only ``Task.cancel()``: an operation's real work runs outside its
coroutine (qemu-img in a process, libvirt calls in a pool thread, libvirtd's migration job).
Cancelling the coroutine alone left that work running while the runner released the VM's or
volume's lock and said CANCELLED, and a qemu-img convert that then finished put the volume in
place after all. So:

* each operation runs with a :class:`CancelScope` in a context variable; the blocking pools
  copy the caller's context into their threads (blocking.py), so code deep in a thread finds
  the scope with :func:`current` without it being passed down;
* work registers how to stop itself (:meth:`CancelScope.on_cancel`: kill this process, abort
  this job), and the runner calls those hooks before it cancels the coroutine;
* a pool call that is already running is waited for (until its own deadline) before the
  cancelled coroutine goes on, so the resource stays locked until the worker has ended;
* work marks its point of no return (:meth:`CancelScope.commit`): from there a cancel is
  refused, FAILED_PRECONDITION with the reason, instead of being answered CANCELLED for work
  that completed. The check and the mark are atomic with the runner's cancel.

Operations opt in (``cancellable=True`` when submitted); every other kind answers
FAILED_PRECONDITION ("cannot be cancelled"), since a cancel of work that cannot be stopped or
rolled back would only be a lie about it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from typing import Awaitable, Callable, TypeVar

from cna_agent.errors import AgentError, FailedPrecondition

log = logging.getLogger(__name__)
T = TypeVar("T")


class Cancelled(AgentError):
    """Raised inside the work (a thread) once its operation is cancelled; the runner records
    the operation CANCELLED whatever the work raised after a cancel."""

    code = "CANCELLED"


class CancelScope:
    """The cancel state of one operation; thread-safe (hooks and checks run in pool threads)."""

    def __init__(self, what: str, *, cancellable: bool = True, refusal: str = "") -> None:
        self.what = what
        self._lock = threading.Lock()
        self._cancelled = False
        self._refusal = "" if cancellable else (refusal or f"{what} cannot be cancelled")
        self._hooks: dict[int, Callable[[], None]] = {}
        self._next = 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def refusal(self) -> str:
        """Why a cancel would be refused now ("" when it would be taken)."""
        return self._refusal

    def request(self) -> None:
        """The runner's half of a cancel: refused (FailedPrecondition naming why) past the point
        of no return, else marked and every hook run, newest first."""
        with self._lock:
            if self._refusal:
                raise FailedPrecondition(self._refusal, field="id")
            already, self._cancelled = self._cancelled, True
            hooks = list(reversed(self._hooks.values()))
        if already:
            return
        for hook in hooks:
            try:
                hook()
            except Exception:  # one hook failing must not keep the others from stopping their work
                log.exception("event=operation.cancel_hook_failed what=%s", self.what)

    def check(self) -> None:
        """Raise Cancelled when a cancel came (for loops and steps between blocking calls)."""
        if self._cancelled:
            raise Cancelled(f"{self.what} was cancelled")

    def commit(self, reason: str) -> None:
        """The point of no return: raise Cancelled if a cancel already came, otherwise refuse
        every later one with ``reason`` (e.g. "the volume is being put in place")."""
        with self._lock:
            if self._cancelled:
                raise Cancelled(f"{self.what} was cancelled")
            self._refusal = reason

    def refuse(self, reason: str) -> None:
        """Refuse every later cancel with ``reason``, whether or not one came: for work that
        finds itself past the point of no return anyway (a migration libvirt completed)."""
        with self._lock:
            self._refusal = reason

    def reopen(self) -> None:
        """Undo :meth:`commit` when the step it guarded failed and the work goes on undoing."""
        with self._lock:
            self._refusal = ""

    def on_cancel(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run ``hook`` (from the cancelling thread; it must not block) when a cancel comes, or
        now if one already came; returns the function that unregisters it."""
        with self._lock:
            if not self._cancelled:
                key, self._next = self._next, self._next + 1
                self._hooks[key] = hook
                return lambda: self._drop(key)
        hook()
        return lambda: None

    def _drop(self, key: int) -> None:
        with self._lock:
            self._hooks.pop(key, None)


_current: contextvars.ContextVar[CancelScope | None] = contextvars.ContextVar("cna_cancel_scope", default=None)


def current() -> CancelScope | None:
    """The scope of the operation this code runs for (None outside operations)."""
    return _current.get()


def enter(scope: CancelScope) -> contextvars.Token:
    """Make ``scope`` current in this context (the runner, at the start of an operation's task)."""
    return _current.set(scope)


async def detached(coro: Awaitable[T]) -> T:
    """Await ``coro`` outside any operation's scope: the clean-up of a cancelled operation (its
    commands would otherwise be killed by the very cancel they clean up after)."""
    ctx = contextvars.copy_context()
    ctx.run(_current.set, None)
    return await asyncio.get_running_loop().create_task(coro, context=ctx)  # type: ignore[arg-type]


def check() -> None:
    """:meth:`CancelScope.check` of the current scope, if any."""
    scope = _current.get()
    if scope is not None:
        scope.check()


def commit(reason: str) -> None:
    """:meth:`CancelScope.commit` of the current scope, if any."""
    scope = _current.get()
    if scope is not None:
        scope.commit(reason)


def refuse(reason: str) -> None:
    """:meth:`CancelScope.refuse` of the current scope, if any."""
    scope = _current.get()
    if scope is not None:
        scope.refuse(reason)


def on_cancel(hook: Callable[[], None]) -> Callable[[], None]:
    """:meth:`CancelScope.on_cancel` of the current scope; outside operations nothing to do."""
    scope = _current.get()
    return scope.on_cancel(hook) if scope is not None else (lambda: None)
