"""Child processes that do not outlive the run that started them.

A package client (``npm pack``, ``pip download``) left running after its parent was killed
keeps writing into a temporary directory nobody will move into place. Two guards:
:func:`terminate_raises` turns SIGTERM into ``SystemExit`` for a block, so the ``finally``
clauses that kill the child and remove temporary files run as they do on Ctrl-C
(``subprocess.run`` kills its child on any exception); :func:`child_dies_with_parent` asks
Linux to send the child SIGTERM when its parent dies, which also covers SIGKILL.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

__all__ = ["terminate_raises", "child_dies_with_parent"]


def _set_parent_death_signal() -> None:
    # Runs in the child between fork and exec: no Python objects of the parent are touched.
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_dies_with_parent() -> dict:
    """Keyword arguments for ``subprocess.run``/``Popen``: on Linux the child gets SIGTERM when we die."""
    return {"preexec_fn": _set_parent_death_signal} if sys.platform.startswith("linux") else {}


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` inside the block (main thread only, where signals land)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
