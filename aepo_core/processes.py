"""No process outlives `aepo run`: the temporary Prefect server dies with the command that started it.

With no `PREFECT_API_URL`, Prefect starts a temporary API server (a uvicorn child process) on first
use and stops it at exit (atexit). A SIGKILL skips atexit, and the server, reparented to init, kept
listening on 127.0.0.1 forever. `start_prefect_server()` starts that same server up front, from the
main thread, and pairs it with a tiny watchdog process that the kernel signals when this process
dies (prctl PR_SET_PDEATHSIG): the watchdog then ends the server. A normal exit stops the server as
before (Prefect's atexit) and the watchdog with it.
"""

from __future__ import annotations

import os
import subprocess
import sys

_WATCHDOG = r"""
import ctypes, os, signal, sys, time

server, parent = int(sys.argv[1]), int(sys.argv[2])


def alive():
    try:
        with open(f"/proc/{server}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{server}/cmdline", "rb") as fh:
            ours = b"uvicorn" in fh.read()
    except OSError:
        return False
    return ours and state != "Z"


def end(*_):
    if alive():
        os.kill(server, signal.SIGTERM)
        for _ in range(50):
            if not alive():
                break
            time.sleep(0.1)
        else:
            if alive():
                os.kill(server, signal.SIGKILL)
    os._exit(0)


signal.signal(signal.SIGTERM, end)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is for aepo, which stops the server itself
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != parent:  # the parent died before prctl took effect
    end()
while alive():
    time.sleep(2)
"""

_watchdog: subprocess.Popen | None = None


def start_prefect_server() -> int | None:
    """Start Prefect's temporary server now (when no PREFECT_API_URL is configured) with a watchdog
    that ends it if this process is killed; returns the server's pid (None with a configured API).
    Call from the main thread (the kernel's parent-death signal follows the thread that forks)."""
    global _watchdog
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or not sys.platform.startswith("linux"):
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()  # the same instance Prefect's client uses later (one per process)
    pid = server.server_process.pid
    if _watchdog is None or _watchdog.poll() is not None:
        _watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(pid), str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
        )
    return pid
