"""The per-job compute limit: run a function in the current thread and interrupt it at a deadline.

As rq's ``timeouts.py`` does with a signal, but for a worker thread (signals reach only the main
thread): a timer thread injects ``JobTimeout`` with ``PyThreadState_SetAsyncExc``. It lands at the
next Python bytecode, i.e. between tensor operations, so a single long kernel finishes first.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

from service.errors import JobTimeout

T = TypeVar("T")


def call_with_deadline(fn: Callable[[], T], timeout_s: float) -> T:
    """Run ``fn`` in this thread; raise ``JobTimeout`` in it if it runs longer than ``timeout_s``.

    The lock and flag make sure the exception is never injected after ``fn`` returned, and the
    ``except`` here catches it wherever it lands.
    """
    ident, lock, state = threading.get_ident(), threading.Lock(), {"finished": False}

    def expire() -> None:
        with lock:
            if not state["finished"]:
                inject = ctypes.pythonapi.PyThreadState_SetAsyncExc
                inject(ctypes.c_ulong(ident), ctypes.py_object(JobTimeout))

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        try:
            out = fn()
            with lock:
                state["finished"] = True
            return out
        finally:
            timer.cancel()
    except JobTimeout:
        raise JobTimeout(
            f"computing took longer than the limit of {timeout_s:g} s per job "
            "(EXCLIP_JOB_TIMEOUT_S); use fewer steps, captions or a smaller image"
        ) from None
