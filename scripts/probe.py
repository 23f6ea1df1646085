"""A reliability probe of the kinds of fault in issue 12, with inputs of its own (not the tests').

    python scripts/probe.py                 # everything (about 5 minutes on 2 cores)
    python scripts/probe.py --only rewards,data,config   # the fast, in-process parts
    python scripts/probe.py --kills 6       # more kill-anywhere trials

Parts:
  rewards  math-verify rewards: final answer = last complete box, \\fbox, no box, hedges, bad golds
  data     local files: exact answer/id text in every format, errors that say where
  config   options that cannot work are refused naming the key; dependent overrides in any order
  cli      user mistakes through the real `aepo` command: one 'error:' line, status 2, nothing left
  kill     SIGKILL `aepo run` at random moments, resume, compare every stage digest with an
           uninterrupted run; no process and no temporary folder outlives it
Prints one line per check (ok / FAIL) and exits 1 if any check failed. Needs the base policy in
$AEPO_CACHE (or ~/.cache/aepo); builds it first if missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail and not ok else ""), flush=True)
    if not ok:
        FAILURES.append(name)


# ------------------------------------------------------------------------------------------ rewards
def probe_rewards() -> None:
    from aepo_core.io.verifiers import make_verifier

    cases = [
        # (response, gold, expected reward, expected verdict or None)
        ("the total is \\boxed{\\$4.50}", "\\$4.50", 1.0, "correct"),
        ("\\boxed{50\\%}", "50\\%", 1.0, "correct"),
        ("\\boxed{3} no wait \\boxed{4", "3", 0.0, "no_answer"),
        ("\\boxed{2} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0, "correct"),
        ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0, "no_answer"),
        ("so \\fbox{17}", "17", 1.0, "correct"),
        ("the answer is 17", "17", 0.0, "no_answer"),
        ("maybe 2 or 3", "3", 0.0, "no_answer"),
        ("\\boxed{12}", "12", 1.0, "correct"),
        ("\\boxed{11}", "12", 0.0, "wrong"),
    ]
    verifier = make_verifier("math")
    try:
        judged = verifier.judge_batch([c[0] for c in cases], [c[1] for c in cases])
        for (text, gold, reward, verdict), j in zip(cases, judged, strict=True):
            ok = j.reward == reward and (verdict is None or j.verdict == verdict)
            check(f"reward {text!r} vs gold {gold!r} -> {reward} {verdict}", ok, f"got {j.reward} {j.verdict}")
        bad = verifier.judge_batch(["\\boxed{1}"], ["\\unknowncommand{"])[0]
        check("an unreadable gold is its own verdict, never 'wrong'", bad.verdict == "bad_gold" and bad.reward == 0.0,
              f"got {bad.verdict}")
    finally:
        verifier.close()


# ------------------------------------------------------------------------------------------ data
def probe_data(tmp: Path) -> None:
    from aepo_core.config import load_config
    from aepo_core.pipeline.sources import load_prompt_table

    def table(path: Path, *extra: str):
        return load_prompt_table(load_config(None, [f"data.train={path}", "data.verifier=math", *extra]).data, "train")

    exact = ["0.10", "1e3", "-0", "+7", "12345678901234567890123", "nan", "null", "TRUE", "0x1F", "1,000"]
    jsonl = tmp / "exact.jsonl"
    jsonl.write_text("".join(f'{{"prompt": "q{i}", "answer": {json.dumps(a) if not _is_json_number(a) else a}}}\n'
                             for i, a in enumerate(exact)))
    got = table(jsonl).column("answer").to_pylist()
    check("jsonl answers (numbers included) keep their exact text", got == exact, f"got {got}")
    csv = tmp / "exact.csv"
    csv.write_text("prompt,answer,id\n" + "".join(f'q{i},"{a}",{i:03d}\n' for i, a in enumerate(exact)))
    t = table(csv, "data.id_column=id")
    check("csv answers keep their exact text", t.column("answer").to_pylist() == exact, f"got {t.column('answer').to_pylist()}")
    check("csv ids keep leading zeros", t.column("id").to_pylist()[:3] == ["000", "001", "002"], f"got {t.column('id').to_pylist()[:3]}")

    def error_of(path: Path, *extra: str) -> str:
        try:
            table(path, *extra)
        except Exception as exc:  # noqa: BLE001 - the probe reports any error's text
            return str(exc)
        return ""

    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n{"prompt": "c" "answer": 3}\n')
    msg = error_of(bad)
    check("malformed jsonl names the file and line 3", str(bad) in msg and "3" in msg, msg)
    dup = tmp / "dup.csv"
    dup.write_text("prompt,answer,id\na,1,x7\nb,2,y8\nc,3,x7\n")
    msg = error_of(dup, "data.id_column=id")
    check("duplicate ids name the id", "x7" in msg and str(dup) in msg, msg)
    missing = tmp / "missing.csv"
    missing.write_text("question,answer\na,1\n")
    msg = error_of(missing)
    check("a missing prompt column is named with the columns there", "prompt" in msg and "question" in msg, msg)
    empty = tmp / "empty.json"
    empty.write_text("")
    msg = error_of(empty)
    check("an empty json file says it is empty", str(empty) in msg and "empty" in msg.lower(), msg)


def _is_json_number(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return text not in ("null",) and not text.startswith("+") and text.lower() not in ("true", "nan")


# ------------------------------------------------------------------------------------------ config
def probe_config() -> None:
    from aepo_core.config import ConfigError, load_config

    for override, key in [
        ("rollout.temperature=0", "rollout.temperature"),
        ("rollout.n=1", "rollout.n"),
        ("trainer.mini_batches=0", "trainer.mini_batches"),
        ("algorithm.name=ppo", "algorithm.name"),
        ("evaluation.top_p=1.5", "evaluation.top_p"),
    ]:
        try:
            load_config(None, [override])
            msg = ""
        except ConfigError as exc:
            msg = str(exc)
        check(f"refused at load: {override}", key in msg, msg or "accepted")
    try:
        load_config(None, ["algorithm.loss_constant=8", "algorithm.loss_agg=constant"])
        ok = True
    except ConfigError:
        ok = False
    check("dependent overrides in any order", ok)


# ------------------------------------------------------------------------------------------ cli
def _aepo(*args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aepo_core.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def _env(tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_LOGGING_LEVEL="WARNING")
    env.pop("AEPO_DEBUG", None)
    return env


def probe_cli(tmp: Path, base: Path) -> None:
    env = _env(tmp)
    not_yaml = tmp / "weights.bin"
    not_yaml.write_bytes(bytes(range(256)) * 4)
    a_file = tmp / "a-file"
    a_file.write_text("x")
    csv = tmp / "train.csv"
    csv.write_text("prompt,answer\nwhat is 1+1?,2\n")
    cases = [
        ("unknown override key", ["run", "--run-dir", str(tmp / "r1"), "rollout.nn=3"], "rollout.nn", tmp / "r1"),
        ("a directory as config", ["run", "--config", str(tmp), "--run-dir", str(tmp / "r2")], str(tmp), tmp / "r2"),
        ("binary config", ["run", "--config", str(not_yaml), "--run-dir", str(tmp / "r3")], str(not_yaml), tmp / "r3"),
        ("missing train file", ["run", "--run-dir", str(tmp / "r4"), f"data.train={tmp / 'nope.parquet'}",
                                "data.verifier=math"], "nope.parquet", tmp / "r4"),
        ("run dir inside a file", ["run", "--run-dir", str(a_file / "sub")], str(a_file), None),
        ("a rerun of a stage that does not exist", ["rerun-stage", "--run-dir", str(tmp / "r5"), "--iteration", "0",
                                                    "--stage", "rewrd"], "", tmp / "r5"),
        ("evaluate a model folder that does not exist", ["evaluate", "--model", str(tmp / "no-model")], "no-model", None),
    ]
    for name, args, needle, created in cases:
        res = _aepo(*args, *([f"model.path={base}"] if args[0] == "run" else []), env=env)
        err = res.stderr.strip()
        lines = [line for line in err.splitlines() if line.strip()]
        ok = (res.returncode == 2 and "Traceback" not in err and len(lines) <= 6 and needle in err
              and (created is None or not created.exists()))
        check(f"cli: {name}: status 2, one short message, nothing created", ok,
              f"rc={res.returncode}, {len(lines)} lines: {err[-300:]!r}")


# ------------------------------------------------------------------------------------------ kill
TINY = ["rollout.prompts_per_batch=4", "rollout.n=3", "rollout.max_new_tokens=24", "algorithm.reinforce_sample_num=2",
        "algorithm.reg_prompt_fraction=0.5", "evaluation.every=2", "evaluation.n=1", "evaluation.num_prompts=4",
        "data.synthetic.n_train=64", "data.synthetic.n_eval=8", "trainer.lr=1e-4"]


def _stage_digests(run_dir: Path) -> dict[str, str]:
    out = {}
    for manifest in sorted(run_dir.glob("iter_*/*/_SUCCESS.json")):
        out[str(manifest.parent.relative_to(run_dir))] = json.loads(manifest.read_text())["digest"]
    return out


def _listening_children_gone(marker: str) -> bool:
    """No process whose command line mentions this probe's run folder is left."""
    mine = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                env = (proc / "environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmd or marker in env:
                mine.append(f"{proc.name}: {cmd[:80]}")
    return not mine, mine


def probe_kill(tmp: Path, base: Path, kills: int, iterations: int = 2) -> None:
    env = _env(tmp)
    env["AEPO_PROBE_MARKER"] = str(tmp)  # lets the probe find every process it started
    args = ["run", "--iterations", str(iterations), f"model.path={base}", f"run.runs_root={tmp / 'runs'}", *TINY]
    ref_dir = tmp / "reference"
    started = time.perf_counter()
    res = _aepo(*args, "--run-dir", str(ref_dir), env=env, timeout=1200)
    full = time.perf_counter() - started
    check("uninterrupted reference run", res.returncode == 0, res.stderr[-500:])
    if res.returncode != 0:
        return
    reference = _stage_digests(ref_dir)
    rng = random.Random(12)
    for trial in range(kills):
        run_dir = tmp / f"killed-{trial}"
        kill_at = rng.uniform(2.0, max(3.0, full * 0.9))
        for _ in range(3):  # up to three kills on the same run, then a clean finish
            proc = subprocess.Popen([sys.executable, "-m", "aepo_core.cli", *args, "--run-dir", str(run_dir)],
                                    env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                proc.wait(timeout=kill_at)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            kill_at = rng.uniform(1.0, full * 0.6)
        res = _aepo(*args, "--run-dir", str(run_dir), env=env, timeout=1200)
        ok = res.returncode == 0 and _stage_digests(run_dir) == reference
        check(f"kill trial {trial}: resumed to the reference digests", ok, res.stderr[-400:])
        leftovers = list(run_dir.rglob(".*.tmp-*"))
        check(f"kill trial {trial}: no temporary folder left", not leftovers, str(leftovers[:3]))
    time.sleep(2)  # a watchdog gets a moment to end what a killed run left
    gone, procs = _listening_children_gone(str(tmp))
    check("no process of a killed run is left", gone, "; ".join(procs[:5]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="rewards,data,config,cli,kill")
    parser.add_argument("--kills", type=int, default=3)
    ns = parser.parse_args()
    parts = set(ns.only.split(","))
    with tempfile.TemporaryDirectory(prefix="aepo-probe-") as name:
        tmp = Path(name)
        if "rewards" in parts:
            probe_rewards()
        if "data" in parts:
            probe_data(tmp)
        if "config" in parts:
            probe_config()
        if parts & {"cli", "kill"}:
            from aepo_core.config import SyntheticTaskConfig
            from aepo_core.task.base_policy import ensure_base_policy

            base = ensure_base_policy(SyntheticTaskConfig(), log=None)
            if "cli" in parts:
                probe_cli(tmp, base)
            if "kill" in parts:
                probe_kill(tmp, base, ns.kills)
    print(f"\n{len(FAILURES)} failed" + (": " + "; ".join(FAILURES) if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
