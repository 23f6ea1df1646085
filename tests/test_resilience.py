"""Faults around a run directory (issue 12, items 13-16), with real components: damaged artifacts,
one writer per run directory (a real second process), a deleted or locked MLflow store (real
sqlite), and a full disk during a save (a writer that fails as a full disk does)."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aepo_core import atomic
from aepo_core.atomic import DiskFull, atomic_dir
from aepo_core.config import load_config, save_config
from aepo_core.pipeline import rundir
from aepo_core.pipeline.rundir import MANIFEST, DamagedStage, RunDir, RunDirBusy

REPO = Path(__file__).resolve().parents[1]


def _stage(run: RunDir, iteration=0, stage="update", files=None):
    files = files or {"policy/model.safetensors": b"\x00" * 4096, "optimizer.pt": b"opt" * 100}
    with run.publish(iteration, stage, {"x": "1"}) as (tmp, metrics):
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        metrics["reward_mean"] = 0.25
    return run.stage_dir(iteration, stage)


# ------------------------------------------------------------------------------ 13: damaged artifacts
def test_a_damaged_stage_is_named_by_path(tmp_path):
    run = RunDir(tmp_path)
    folder = _stage(run)
    assert run.damage(0, "update") is None
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["files"]) == {"policy/model.safetensors", "optimizer.pt"}

    weights = folder / "policy" / "model.safetensors"
    with open(weights, "r+b") as fh:  # one flipped bit, same size, mtime put back
        fh.seek(100)
        fh.write(b"\x01")
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    assert run.damage(0, "update") == f"{weights} differs from the digest in its {MANIFEST} (damaged stage)"
    with pytest.raises(DamagedStage, match=f"{weights} differs.*aepo run --run-dir"):
        run.digest(0, "update")

    weights.write_bytes(b"\x00" * 10)  # truncated
    assert "model.safetensors differs" in run.damage(0, "update")
    weights.unlink()
    assert run.damage(0, "update") == f"{weights} is missing (damaged stage)"
    (folder / "extra.bin").write_bytes(b"?")
    weights.write_bytes(b"\x00" * 4096)
    assert run.damage(0, "update") == f"{folder / 'extra.bin'} was not written by this stage (damaged stage)"
    (folder / "extra.bin").unlink()
    assert run.damage(0, "update") is None and run.digest(0, "update") == manifest["digest"]


def test_each_file_is_digested_once_per_process(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    _stage(run)
    reads = []
    monkeypatch.setattr(rundir, "open", lambda path, *a: reads.append(Path(path).name) or open(path, *a), raising=False)
    for _ in range(3):
        run.digest(0, "update")
    assert reads == []  # what this process published is not read back
    rundir._DIGESTS.clear()  # a new process
    run.digest(0, "update")
    first = len(reads)
    run.digest(0, "update")
    assert sorted(reads) == ["model.safetensors", "optimizer.pt"]  # each file once, then never again
    run.digest(0, "update")
    assert len(reads) == first


def test_is_stage_complete_reports_and_refuses_a_damaged_stage(tmp_path):
    from aepo_core.pipeline import stages

    cfg = load_config(None, ["run.iterations=1"])
    run = RunDir(tmp_path)
    run.dataset_path("train").parent.mkdir(parents=True)
    run.dataset_path("train").write_bytes(b"train")
    with run.publish(0, "prepare", stages.upstream(run, cfg, 0, "prepare")) as (tmp, _):
        (tmp / "prompts.parquet").write_bytes(b"p")
    said = []
    assert stages.is_stage_complete(run, cfg, 0, "prepare", log=said.append)
    (run.stage_dir(0, "prepare") / "prompts.parquet").unlink()
    assert not stages.is_stage_complete(run, cfg, 0, "prepare", log=said.append)
    assert said == [f"{run.stage_dir(0, 'prepare') / 'prompts.parquet'} is missing (damaged stage): "
                    "recomputing prepare of iteration 0"]


def test_a_changed_starting_policy_is_refused_naming_it(tmp_path):
    from aepo_core.pipeline import stages

    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"w" * 64)
    run = RunDir(tmp_path / "run")
    run.write_json("base.json", {"path": str(base), "digest": rundir.folder_digest(base)})
    assert stages.verified_base_digest(run) == rundir.folder_digest(base)
    (base / "model.safetensors").write_bytes(b"w" * 32)
    with pytest.raises(DamagedStage, match=f"the starting policy {base} is missing or differs from the digest in "
                                           f"{run.root / 'base.json'}: restore it"):
        stages.verified_base_digest(run)


def test_a_full_disk_while_creating_a_run_leaves_no_run_directory(tmp_path, monkeypatch, base_policy_dir):
    from aepo_core.pipeline import stages

    cfg = load_config(None, [f"model.path={base_policy_dir}", f"run.runs_root={tmp_path}",
                             "data.synthetic.n_train=20", "data.synthetic.n_eval=5"])
    monkeypatch.setattr(stages.pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFull, match=f"no space left on device writing {tmp_path / 'r'}: needs at least"):
        stages.init_run(cfg, tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ 14: one writer
_HOLDER = """
import sys, time
from aepo_core.pipeline.rundir import RunDir
RunDir(sys.argv[1]).acquire_writer()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        run = RunDir(tmp_path)
        with pytest.raises(RunDirBusy) as info:
            run.acquire_writer()
        message = str(info.value)
        assert f"{tmp_path} is in use by pid {holder.pid} on {os.uname().nodename} since 20" in message
        assert message.endswith("wait for it to finish or stop it") and "\n" not in message
        assert run.writer_holder().startswith(f"pid {holder.pid} ")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the dead holder's lock: no stale lock to delete by hand
    run = RunDir(tmp_path)
    assert run.writer_holder() is None
    with run.writer():
        with run.writer():  # re-entrant within one process (a rerun that resumes the run)
            assert run.holds_writer()
        assert run.holds_writer()
    assert not run.holds_writer()


def test_the_writer_removes_what_interrupted_saves_left(tmp_path):
    run = RunDir(tmp_path)
    _stage(run)
    leftovers = [run.root / "iter_0000" / ".update.tmp-abc123", run.root / "iter_0000" / ".update.old-x1",
                 run.root / ".mlflow.json.tmp-q"]
    leftovers[0].mkdir()
    (leftovers[0] / "optimizer.pt").write_bytes(b"half")
    leftovers[1].mkdir()
    leftovers[2].write_text("{")
    with pytest.raises(RuntimeError, match="needs the writer lock"):
        run.remove_stale_temporaries()
    with run.writer():
        assert run.remove_stale_temporaries() == sorted(leftovers)
    assert not any(p.exists() for p in leftovers) and run.damage(0, "update") is None


# ------------------------------------------------------------------------------ 16: disk full
def _fill_then_fail(tmp: Path, exc: BaseException):
    (tmp / "optimizer.pt").write_bytes(b"x" * 3000)
    raise exc


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3008 vs 2944"),
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"),
])
def test_a_full_disk_is_one_line_with_path_needed_and_free_and_leaves_nothing(tmp_path, monkeypatch, exc):
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: type("U", (), {"free": 2048, "total": 10**9, "used": 0})())
    final = tmp_path / "iter_0001" / "update"
    with pytest.raises(DiskFull) as info, atomic_dir(final) as tmp:
        _fill_then_fail(tmp, exc)
    assert str(info.value) == (
        f"no space left on device writing {final}: needs at least 2.9 KiB (written before it failed), 2.0 KiB free "
        "on its file system; free some space and run the same command again (it resumes here)"
    )
    assert list(final.parent.iterdir()) == []  # no half stage, no temporary folder
    with pytest.raises(DiskFull, match=r"needs about 1\.0 MiB, 2\.0 KiB free"), atomic_dir(final, expected_bytes=1 << 20) as tmp:
        _fill_then_fail(tmp, exc)


def test_a_short_write_with_room_to_spare_keeps_its_own_error(tmp_path):
    with pytest.raises(RuntimeError, match="unexpected pos"), atomic_dir(tmp_path / "x") as tmp:
        _fill_then_fail(tmp, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2"))


def test_a_real_torch_save_that_hits_a_full_disk(tmp_path, monkeypatch):
    """torch.save's own error when its writes come up short (the file system says ENOSPC)."""
    import torch

    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: type("U", (), {"free": 0, "total": 1, "used": 1})())

    class Full:  # a file that takes 1000 bytes, then the disk is full
        def __init__(self):
            self.n = 0

        def write(self, data):
            if self.n + len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += len(data)
            return len(data)

        def flush(self):
            pass

    final = tmp_path / "update"
    with pytest.raises(DiskFull, match=f"no space left on device writing {final}: needs about 4.0 MiB"), \
            atomic_dir(final, expected_bytes=4 << 20):
        torch.save({"w": torch.zeros(1 << 20)}, Full())
    assert not final.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ 14: MLflow store
def _tracked_run(root: Path, iterations=2):
    cfg = load_config(None, [f"run.runs_root={root.parent}", f"run.iterations={iterations}"])
    run = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config_path)
    for i in range(iterations):
        with run.publish(i, "reward", {"x": str(i)}) as (tmp, m):
            (tmp / "rewards.parquet").write_bytes(b"r%d" % i)
            m["reward_mean"] = 0.5 + i
    return run, cfg


def _points(uri, run_id, key="reward/reward_mean"):
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_a_deleted_mlflow_db_is_rebuilt_from_the_manifests(tmp_path):
    from aepo_core.pipeline.tracking import Tracker

    run, cfg = _tracked_run(tmp_path / "runs" / "r")
    tracker = Tracker(run, cfg)
    tracker.open()
    for i in range(2):
        tracker.sync(i)
    tracker.log_checkpoint(1, run.stage_dir(1, "reward"), run.digest(1, "reward"), upload=False)
    tracker.finish()
    old = tracker.run_id
    (tmp_path / "runs" / "mlflow.db").unlink()

    # the next process (a resume) finds its MLflow run gone and rebuilds it
    reopen = ("import sys; from aepo_core.pipeline.rundir import RunDir; from aepo_core.pipeline.tracking import Tracker; "
              "run = RunDir(sys.argv[1]); t = Tracker(run, run.config()); print(t.open()); t.finish()")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", reopen, str(run.root)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"MLflow run {old} is not in {tracker.uri}: rebuilding it from {run.root}" in done.stdout
    new = done.stdout.split()[-1]
    assert new != old and json.loads((run.root / "mlflow.json").read_text())["run_id"] == new
    db = sqlite3.connect(tmp_path / "runs" / "mlflow.db")  # this process's MLflow still holds the deleted file

    def points():
        return db.execute("SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'reward/reward_mean' "
                          "ORDER BY step", (new,)).fetchall()

    assert points() == [(0, 0.5), (1, 1.5)]
    assert db.execute("SELECT value FROM tags WHERE run_uuid = ? AND key = 'replaces_run_id'", (new,)).fetchone() == (old,)
    assert db.execute("SELECT value FROM params WHERE run_uuid = ? AND key = 'rollout.n'", (new,)).fetchone() == (str(cfg.rollout.n),)
    assert json.loads((run.root / "mlflow.json").read_text())["checkpoints"]["0001"]["digest"] == run.digest(1, "reward")
    again = subprocess.run([sys.executable, "-c", reopen, str(run.root)], env=env, capture_output=True, text=True, timeout=120)
    assert again.stdout.split()[-1] == new and "rebuilding" not in again.stdout  # kept from then on
    assert points() == [(0, 0.5), (1, 1.5)]  # nothing logged twice


_LOCKER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
c.execute("COMMIT")
"""


def test_a_locked_mlflow_store_is_waited_on_then_refused_with_its_name(tmp_path, monkeypatch):
    from aepo_core.pipeline.tracking import Tracker, TrackingStoreLocked

    run, cfg = _tracked_run(tmp_path / "runs" / "r")
    tracker = Tracker(run, cfg)
    tracker.open()
    db = str(tmp_path / "runs" / "mlflow.db")
    locker = subprocess.Popen([sys.executable, "-c", _LOCKER, db, "3"], stdout=subprocess.PIPE, text=True)
    assert locker.stdout.readline().strip() == "locked"
    started = time.monotonic()
    assert tracker.sync(0) > 0  # waited for the other process's transaction to end
    assert time.monotonic() - started > 1.5
    locker.wait()

    monkeypatch.setenv("AEPO_MLFLOW_LOCK_WAIT", "1")
    locker = subprocess.Popen([sys.executable, "-c", _LOCKER, db, "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        with pytest.raises(TrackingStoreLocked, match=f"MLflow store {tracker.uri} stayed locked by another process for 1 s"):
            tracker.sync(1)
    finally:
        locker.kill()
        locker.wait()
    assert tracker.sync(1) > 0 and _points(tracker.uri, tracker.run_id) == [(0, 0.5), (1, 1.5)]
    with sqlite3.connect(db) as con:  # the store is intact
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# ------------------------------------------------------------------------------ 15 (+14): a real `aepo run`
def _children(pid: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found[int(entry.name)] = cmdline
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_a_killed_run_leaves_no_process_and_no_leftovers_and_a_second_writer_is_refused(
    base_policy_dir, tmp_path, tiny_overrides
):
    root = tmp_path / "runs"
    run_dir = root / "killed"
    cmd = [sys.executable, "-m", "aepo_core.cli", "run", "--run-dir", str(run_dir), "--iterations", "50", "--no-progress"]
    cmd += tiny_overrides(base_policy_dir, root)  # 50 iterations: still running when it is killed
    # the restart below shortens the run to 1 iteration, which makes iteration 0 the last and due for
    # evaluation: its policy must not have been pruned in the meantime (retention keeps the last one)
    cmd += ["run.keep_policies_every=1"]
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO))
    env.pop("PREFECT_API_URL", None)  # as a user would: Prefect's temporary server
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run = RunDir(run_dir)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and run.manifest(0, "prepare") is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        helpers = _children(proc.pid)
        servers = [pid for pid, cmdline in helpers.items() if "-m uvicorn" in cmdline]
        assert len(servers) == 1 and len(helpers) >= 2, helpers  # the server and its watchdog

        # 14: a second `aepo run` on the same run directory is refused, naming the holder
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"{run_dir} is in use by pid {proc.pid} on {os.uname().nodename} since 20" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1

        os.kill(proc.pid, signal.SIGKILL)  # the process only, not its group: as `kill -9 PID`
        proc.wait(30)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(pid) for pid in helpers):
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in helpers), {p: c for p, c in helpers.items() if _alive(p)}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    # the next start removes what an interrupted save left, and rebuilds a deleted MLflow store's run
    leftover = run_dir / "iter_0000" / ".rollout.tmp-killed"
    leftover.mkdir(parents=True)
    (leftover / "rollouts.parquet").write_bytes(b"half")
    old_run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    (root / "mlflow.db").unlink()
    cmd[cmd.index("--iterations") + 1] = "1"
    finished = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert f"removed {leftover} (left by an interrupted save)" in finished.stdout
    assert f"MLflow run {old_run_id} is not in sqlite:///{root / 'mlflow.db'}: rebuilding it" in finished.stdout
    assert not list(run_dir.rglob(".*.tmp-*"))
    assert run.manifest(0, "evaluate") is not None
    new_run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    with sqlite3.connect(root / "mlflow.db") as db:
        steps = db.execute("SELECT step FROM metrics WHERE run_uuid = ? AND key = 'reward/reward_mean'", (new_run_id,))
        assert [s for (s,) in steps] == [0]
