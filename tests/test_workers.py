"""Several workers on one study (PostgreSQL), a killed worker's trial retried, Ctrl-C and resume (SQLite)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

TRIALS = 24


def _search_argv(model_dir, storage, out, trials=TRIALS, study="w"):
    return [sys.executable, "-m", "paretoq.cli", "search", "--model", str(model_dir), "--budget", "3.0",
            "--trials", str(trials), "--storage", storage, "--study", study, "--out", str(out), "--heartbeat", "1",
            "--calib-tokens", "512", "--eval-tokens", "2048", "--seq-len", "64"]


_STORAGES: dict[str, optuna.storages.RDBStorage] = {}


def _trials(storage, study="w"):
    # One storage object per URL: a new one per call would open a new connection pool each time.
    if storage not in _STORAGES:
        _STORAGES[storage] = optuna.storages.RDBStorage(storage)
    return optuna.load_study(study_name=study, storage=_STORAGES[storage]).get_trials(deepcopy=False)


def _running(storage, tag):
    """Trials running in the worker with pid ``tag``; None when the storage is busy (a frozen
    worker may hold SQLite's write lock)."""
    try:
        return [t for t in _trials(storage) if t.state == optuna.trial.TrialState.RUNNING
                and t.user_attrs.get("worker", "").endswith(f":{tag}")]
    except KeyError:  # the study does not exist yet
        return []
    except Exception as exc:  # sqlalchemy.exc.OperationalError: database is locked
        if "locked" in str(exc):
            return None
        raise


def _catch_running(proc, storage, tag, timeout=240):
    """Freeze ``proc`` (SIGSTOP) at a moment it holds a running trial; return that trial's number.
    Freezing first makes the check and the signal that follows race-free."""
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, "the worker ended before it could be caught mid-trial"
        if _running(storage, tag):
            proc.send_signal(signal.SIGSTOP)
            held = _running(storage, tag)
            if held:
                return held[0].number
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("never caught the worker in a trial")


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # three workers on two cores
    return env


@pytest.mark.slow
def test_sigint_then_sigkill_mid_trial_then_resume(tiny_search_model_dir, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    argv = _search_argv(tiny_search_model_dir, storage, tmp_path / "out", trials=20)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    number = _catch_running(proc, storage, proc.pid)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted after" in err and "run the same command again to resume" in err
    trials = _trials(storage)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert next(t for t in trials if t.number == number).state == optuna.trial.TrialState.FAIL
    assert (tmp_path / "out" / "front.json").is_file()  # outputs for what completed
    # SIGKILL mid-trial: no handler runs, the trial stays RUNNING; the next run fails it as stale
    # (no heartbeat for 3 x --heartbeat seconds) and verifies its plan again
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    killed = _catch_running(proc, storage, proc.pid)
    proc.kill()
    proc.wait()
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    trials = _trials(storage)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 20
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    sources = [t.user_attrs["source"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE
               and t.user_attrs.get("source", "").startswith("baseline:")]
    assert len(sources) == len(set(sources))
    by_number = {t.number: t for t in trials}
    assert by_number[killed].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retried and all(t.user_attrs["genome"] == by_number[killed].user_attrs["genome"] for t in retried)


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (initdb into a temporary directory), stopped at the end."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.fail("PostgreSQL is not installed; .ci/run installs Debian's postgresql package")
    root = Path(tempfile.mkdtemp(prefix="paretoq-pg-"))
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(as_user + [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                              f"-c listen_addresses=127.0.0.1 -p {port} -k {root}", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run(as_user + [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                  "paretoq"], check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/paretoq"
    finally:
        for url in [u for u in _STORAGES if u.startswith("postgresql")]:
            _STORAGES.pop(url).engine.dispose()
        subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_three_workers_on_postgres_survive_a_killed_worker(tiny_search_model_dir, tmp_path, postgres_url):
    argv = _search_argv(tiny_search_model_dir, postgres_url, tmp_path / "out")
    workers = [subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
               for _ in range(3)]
    victim = workers[1]
    killed = _catch_running(victim, postgres_url, victim.pid)
    victim.kill()
    victim.wait()
    for w in (workers[0], workers[2]):
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    trials = _trials(postgres_url)
    by_number = {t.number: t for t in trials}
    assert by_number[killed].state == optuna.trial.TrialState.FAIL  # failed as stale by a live worker
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retries and any(t.state == optuna.trial.TrialState.COMPLETE for t in retries)
    assert all(t.user_attrs["genome"] == by_number[killed].user_attrs["genome"] for t in retries)  # the same plan, verified again
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == TRIALS
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    baselines = [t.user_attrs["source"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                 and t.user_attrs.get("source", "").startswith("baseline:")]
    assert baselines and len(baselines) == len(set(baselines))
    assert {"baseline:knapsack", "baseline:uniform-3"} <= set(baselines)
    workers_seen = {t.user_attrs.get("worker") for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(workers_seen) >= 2  # the study really was shared


@pytest.mark.slow
def test_jobs_runs_workers_on_one_study(tiny_search_model_dir, tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    # Trials long enough (8,192 eval tokens) that the second worker joins before the first is done.
    argv = _search_argv(tiny_search_model_dir, storage, tmp_path / "out", trials=40) + ["--jobs", "2"]
    argv[argv.index("--eval-tokens") + 1] = "8192"
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    trials = _trials(storage)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 40 and not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both processes verified plans
    assert (tmp_path / "out" / "plan.json").is_file()
