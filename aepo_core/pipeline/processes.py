"""No process outlives `aepo run`: the temporary Prefect server dies with the command that started it.

With no `PREFECT_API_URL`, Prefect starts a temporary API server (a uvicorn child process) on first
use and stops it at exit (atexit). A SIGKILL skips atexit, and the server, reparented to init, kept
listening on 127.0.0.1 forever. `start_prefect_server()` starts that same server up front, from the
main thread, with a tiny watchdog process started just before it: the watchdog notes the uvicorn
children of this process (a few times a second until it has one, then every 2 s), gets SIGTERM from
the kernel when this process dies (prctl PR_SET_PDEATHSIG) and then ends them. A normal exit stops the server as
before (Prefect's atexit) and the watchdog with it.
"""

from __future__ import annotations

import os
import subprocess
import sys

_WATCHDOG = r"""
import ctypes, os, signal, sys, time

parent = int(sys.argv[1])
servers = set()  # Prefect's uvicorn children of `parent` seen so far (it may restart one at start-up)


def info(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return None
    args = cmdline.split(b"\0")
    return fields[0], int(fields[1]), args[1:3] == [b"-m", b"uvicorn"] and b"prefect.server" in cmdline


def look():
    for name in os.listdir("/proc"):
        if name.isdigit():
            found = info(int(name))
            if found and found[1] == parent and found[2] and int(name) != os.getpid():
                servers.add(int(name))


def alive(pid):
    found = info(pid)
    return bool(found and found[2] and found[0] != "Z")


ending = False


def end(*_):
    global ending
    if ending:
        return
    ending = True
    left = [pid for pid in servers if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 5
    while time.time() < deadline and any(alive(pid) for pid in left):
        time.sleep(0.1)
    for pid in left:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    os._exit(0)


signal.signal(signal.SIGTERM, end)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is for aepo, which stops the server itself
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
while True:
    if os.getppid() != parent:  # the parent died (also before prctl took effect)
        end()
    look()
    time.sleep(0.2 if not servers else 2)
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

    if _watchdog is None or _watchdog.poll() is not None:  # first, so that it sees the server start
        _watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
        )
    server = SubprocessASGIServer()
    server.start()  # the same instance Prefect's client uses later (one per process)
    return server.server_process.pid


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads for this process (and OMP_NUM_THREADS for processes it starts).

    Args:
        threads: run.threads; None keeps torch's default, the cores in this process's affinity mask
            (so `taskset -c 0 aepo run` gets one thread).
    Returns:
        The threads torch now uses.

    Why: two torch processes each running one thread per core on the same cores spin against each
    other (measured: a 3-minute base build took 36 minutes beside one training); give each its share.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return torch.get_num_threads()


def rank_threads(threads: int | None, nproc: int) -> int:
    """A rank's torch threads: its share of run.threads (default: the cores this process may use)."""
    cores = threads or len(os.sched_getaffinity(0))
    return max(1, cores // nproc)
