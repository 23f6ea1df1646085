"""The README's deployment path, for real on loopback: a Prefect server, a process work pool,
`prefect deploy --all` from prefect.yaml, `prefect deployment run`, `prefect worker start --run-once`,
then the flow run's state and its artifacts. Everything started here is stopped here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # workers and servers ignore SIGTERM; SIGINT twice stops them
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(
        PREFECT + ["server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 1800  # hang guard, not a speed check
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline and server.poll() is None, "the Prefect server did not come up"
            time.sleep(0.5)
        env["PREFECT_API_URL"] = api
        yield env
    finally:
        _stop(server)


def _prefect(args: list[str], env: dict, timeout: int = 1800) -> str:
    done = subprocess.run(PREFECT + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_deploy_run_and_watch_on_loopback(prefect_server, base_policy_dir, tmp_path, tiny_overrides):
    env = dict(prefect_server, AEPO_PROJECT_DIR=str(REPO), AEPO_CACHE=str(base_policy_dir.parent))
    _prefect(["work-pool", "create", "aepo-pool", "--type", "process"], env)
    out = _prefect(["--no-prompt", "deploy", "--all"], env)
    for name in ("train/nightly", "evaluate/evaluate", "sweep/sweep", "rerun-stage/rerun-stage"):
        assert name in out, out[-2000:]

    run_dir = tmp_path / "deployed-run"
    params = {"run_dir": str(run_dir), "iterations": 1, "overrides": tiny_overrides(base_policy_dir, tmp_path)}
    out = _prefect(["deployment", "run", "train/nightly", "--params", json.dumps(params)], env)
    flow_run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)

    worker = subprocess.Popen(
        PREFECT + ["worker", "start", "--pool", "aepo-pool", "--run-once"],
        env=env, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = worker.communicate(timeout=1800)
    finally:
        _stop(worker)
    state = json.loads(_prefect(["flow-run", "inspect", flow_run_id, "--output", "json"], env))["state"]
    assert state["type"] == "COMPLETED", output[-4000:]
    for stage in ("prepare", "rollout", "reward", "update", "entropy", "evaluate"):
        assert (run_dir / "iter_0000" / stage / "_SUCCESS.json").is_file(), stage
    check = (
        "from prefect.artifacts import Artifact; "
        "print([Artifact.get(k) is not None for k in ('aepo-deployed-run-metrics', 'aepo-deployed-run-summary')])"
    )
    found = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=600)
    assert found.stdout.strip() == "[True, True]", found.stdout + found.stderr
