"""Small facts about processes that several modules need: whether a pid
is alive, and a child that dies with its parent."""

from __future__ import annotations

import os
import signal
import sys


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a killed
    caller leaves no child running (a quantize, a self-test, a pip). Safe
    to call before exec; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
