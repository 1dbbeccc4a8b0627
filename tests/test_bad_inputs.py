"""Issue 19 and docs/errors.md: every bad input a new user meets, run as a subprocess of the
installed ``paretoq``: exit code 2, exactly one line on stderr naming the problem (no traceback),
and no new or changed file in the output location (a listing with checksums, before and after).

Rows marked fast must fail before the long work: the child uses under ``FAST_CPU_S`` seconds of
CPU beyond what importing paretoq's stages and the tiny model's code costs on this machine
(measured once; about 4 s on an idle 2-core CPU, three times that on a loaded one). CPU time,
not wall time, so that the check holds on a machine shared with other jobs.

Then: an interrupted search prints one line; damaged features and sensitivity cache entries are
recomputed with a one-line warning; ``--trials`` smaller than the baselines says so; and a
hypothesis property test feeds mutated plans, search spaces and front.json files to the
commands in-process: they work or exit 2 with one line, never a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paretoq.cli import main

PARETOQ = shutil.which("paretoq") or str(Path(sys.executable).with_name("paretoq"))
TINY = ["--calib-tokens", "512", "--eval-tokens", "512", "--seq-len", "64"]
FAST_CPU_S = 10.0
pytestmark = pytest.mark.slow


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``, with a checksum for files."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def run(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600):
    """``paretoq args`` in ``cwd``: (exit code, stdout, stderr, CPU seconds of the child alone)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen([PARETOQ, *args], cwd=cwd, stdout=out, stderr=err, env={
            **os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})})
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage, even with others running
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (p.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                usage.ru_utime + usage.ru_stime)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_search_model_dir):
    """A working directory holding good and broken inputs; every row runs in it."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = root / "tiny"
    shutil.copytree(tiny_search_model_dir, model)
    cfg_only = root / "cfg-only"
    cfg_only.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (model / f).is_file():
            shutil.copy(model / f, cfg_only / f)
    truncated = root / "truncated"
    shutil.copytree(model, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate((truncated / "model.safetensors").stat().st_size // 2)
    shard = root / "sharded"
    shutil.copytree(model, shard)
    (shard / "model.safetensors").rename(shard / "model-00001-of-00002.safetensors")
    (shard / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))

    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "nul.txt").write_bytes(b"text\x00with a NUL\n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / "empty.txt").write_text("  \n")
    (root / "short.txt").write_text("import os\n" * 40)
    (root / "calib-dir").mkdir()
    (root / "a-file").write_text("x")
    (root / "bad-space.yaml").write_text("granularity: per-atom\nbits: {expert: [2, 4]}\n")

    from paretoq.models import load_model

    adapter = load_model(str(model), weights=False).adapter
    good = {"format": "paretoq.plan/1", "bits": {c.key: 4 for c in adapter.components},
            "quant": {"method": "gptq", "group_size": 32, "sym": False, "act_order": False, "damp": 0.01},
            "model": {"name_or_path": str(model), "model_type": "deepseek_v3"}}
    (root / "good.json").write_text(json.dumps(good))
    plans = {
        "not-json.json": "{not json",
        "bad-format.json": json.dumps({"format": "paretoq.plan/9", "bits": {}}),
        "bad-key.json": json.dumps({"format": "paretoq.plan/1", "bits": {"model.layers.99.mlp.down_proj": 4}}),
        "bad-bits.json": json.dumps({**good, "bits": {next(iter(good["bits"])): 5}}),
        "gs-abc.json": json.dumps({**good, "quant": {"group_size": "abc"}}),
        "damp-x.json": json.dumps({**good, "quant": {"damp": "x"}}),
        "damp-neg.json": json.dumps({**good, "quant": {"damp": -1}}),
        "damp-nan.json": json.dumps({**good, "quant": {"damp": float("nan")}}),
        "quant-list.json": json.dumps({**good, "quant": [128, False]}),
        "other-model.json": json.dumps({**good, "model": {"name_or_path": str(model), "model_type": "mixtral"}}),
    }
    for name, text in plans.items():
        (root / name).write_text(text)
    (root / "junk.gguf").write_bytes(b"GGUF and then nothing a reader can use")

    # A checkpoint, and two damaged copies of it.
    code, _, err, _ = run(["quantize", "--model", str(model), "--uniform", "4", "--out", "ckpt", "--quiet", *TINY],
                          root)
    assert code == 0, err
    shutil.copytree(root / "ckpt", root / "ckpt-cut")
    with open(sorted((root / "ckpt-cut").glob("model*.safetensors"))[0], "r+b") as f:  # a shard cut short
        f.truncate(1000)
    shutil.copytree(root / "ckpt", root / "ckpt-json")
    text = (root / "ckpt-json" / "quantization.json").read_text()
    (root / "ckpt-json" / "quantization.json").write_text(text[: len(text) // 2])

    # psycopg2 made absent for one row: a package that fails to import, first on the path.
    fake = root / "no-psycopg2" / "psycopg2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'psycopg2'\", name='psycopg2')\n")
    return root


S = ["search", "--model", "tiny", "--storage", "sqlite:///s.db", "--out", "out", *TINY]
Q = ["quantize", "--model", "tiny", "--out", "q", *TINY]

# (id, argv, phrases the line must hold, fast, extra environment)
ROWS = [
    # argument parsing: one line naming the option, the value and what is accepted
    ("budget-abc", ["search", "--budget", "abc"], ["--budget", "'abc'", "between 2 and 8"], True, None),
    ("budget-9", ["search", "--budget", "9"], ["budget 9", "between 2 and 8"], True, None),
    ("seed-x", ["search", "--seed", "x"], ["--seed", "'x'"], True, None),
    ("format-nosuch", ["export", "--plan", "good.json", "--format", "nosuch"], ["--format", "nosuch", "gptqmodel"], True, None),
    ("bits-x", ["search", "--bits", "x"], ["--bits", "'x'", "2,3,4,5,6,8"], True, None),
    ("bits-2,7", ["search", "--bits", "2,7"], ["--bits", "'7'", "2,3,4,5,6,8"], True, None),
    ("bits-5-gptq", ["search", "--bits", "5"], ["--bits 5 leaves no choice"], True, None),
    ("trials-0", ["search", "--trials", "0"], ["--trials", "0", "at least 1"], True, None),
    ("trials-neg", ["search", "--trials", "-5"], ["--trials", "-5", "at least 1"], True, None),
    ("info-budget-nan", ["info", "--budget", "nan"], ["--budget", "nan"], True, None),
    ("info-budget-inf", ["info", "--budget", "inf"], ["--budget", "inf"], True, None),
    ("info-budget-0", ["info", "--budget", "0"], ["--budget", "budget 0"], True, None),
    ("info-budget-neg", ["info", "--budget", "-1"], ["--budget", "budget -1"], True, None),
    ("port-99999", ["dashboard", "--port", "99999"], ["--port", "99999", "1 to 65535"], True, None),
    ("port-65536", ["dashboard", "--port", "65536"], ["--port", "65536"], True, None),
    ("port-neg", ["dashboard", "--port", "-1"], ["--port", "-1"], True, None),
    ("quantize-uniform-5", [*Q, "--uniform", "5"], ["--uniform", "5", "2, 3, 4, 8"], True, None),
    ("eval-uniform-5", ["eval", "--uniform", "5"], ["--uniform", "5", "2, 3, 4, 8"], True, None),
    ("timeout-neg", ["search", "--timeout", "-3"], ["--timeout", "-3", "positive number of seconds"], True, None),
    ("jobs-0", ["search", "--jobs", "0"], ["--jobs", "0", "at least 1"], True, None),
    ("missing-required", ["quantize", "--uniform", "4"], ["required", "--out"], True, None),
    # quantizer settings
    ("group-size-0", [*Q, "--uniform", "4", "--group-size", "0"], ["--group-size", "0", "-1 (per channel)"], True, None),
    ("damp-flag-2", ["eval", "--uniform", "4", "--damp", "2"], ["--damp", "'2'", "0.0001 to 1"], True, None),
    ("target-asym", [*S, "--budget", "4", "--target", "vllm", "--asym"], ["--asym", "vLLM runs sym=True"], True, None),
    ("group-size-48-search", [*S, "--group-size", "48"], ["group size 48 does not divide", "--group-size 256 or 128 or 64 or 32"],
     True, None),
    ("group-size-48-eval", ["eval", "--model", "tiny", "--uniform", "4", "--group-size", "48", *TINY],
     ["group size 48 does not divide", "--group-size 256 or 128 or 64 or 32"], True, None),
    # model directories
    ("config-only-search", [*S[:2], "cfg-only", *S[3:]], ["no weight files"], True, None),
    ("config-only-probe", ["probe", "--model", "cfg-only", "--out", "p", *TINY], ["no weight files"], True, None),
    ("config-only-quantize", [*Q[:2], "cfg-only", *Q[3:], "--uniform", "4"], ["no weight files"], True, None),
    ("config-only-eval", ["eval", "--model", "cfg-only", "--uniform", "4", *TINY], ["no weight files"], True, None),
    ("truncated-search", [*S[:2], "truncated", *S[3:]], ["model.safetensors is truncated"], True, None),
    ("truncated-probe", ["probe", "--model", "truncated", "--out", "p", *TINY], ["is truncated"], True, None),
    ("truncated-quantize", [*Q[:2], "truncated", *Q[3:], "--uniform", "4"], ["is truncated"], True, None),
    ("shard-missing", [*S[:2], "sharded", *S[3:]], ["model-00002-of-00002.safetensors", "missing"], True, None),
    ("unsupported-model", [*S[:2], "bert", *S[3:]], ["model_type 'bert'", "supported"], True, None),
    ("no-model", [*S[:2], "nowhere", *S[3:]], ["does not exist", "--model"], True, None),
    # calibration text
    ("calib-binary", [*S, "--calib", "binary.txt"], ["not UTF-8", "--calib"], True, None),
    ("calib-nul", [*S, "--calib", "nul.txt"], ["binary", "--calib"], True, None),
    ("calib-latin1", [*S, "--calib", "latin1.txt"], ["not UTF-8", "--calib"], True, None),
    ("calib-directory", [*S, "--calib", "calib-dir"], ["is a directory", "--calib"], True, None),
    ("calib-empty", [*S, "--calib", "empty.txt"], ["holds no text"], True, None),
    ("calib-short", [*S, "--calib", "short.txt"], ["--calib-tokens"], True, None),
    # search spaces and storage
    ("space-unknown", [*S, "--space", "nope"], ["unknown search space 'nope'"], True, None),
    ("space-malformed", [*S, "--space", "bad-space.yaml"], ["granularity 'per-atom'"], True, None),
    ("storage-unreachable", [*S[:4], "postgresql+psycopg2://u:s3cret@127.0.0.1:1/db", *S[5:]],
     ["cannot open storage", "u:***@127.0.0.1:1"], True, None),
    ("dashboard-no-psycopg2", ["dashboard", "--storage", "postgresql+psycopg2://u:pw@127.0.0.1:1/db"],
     ["psycopg2", "pip install psycopg2-binary"], True, "no-psycopg2"),
    # plan files
    ("plan-not-json", [*Q, "--plan", "not-json.json"], ["not JSON"], True, None),
    ("plan-format", [*Q, "--plan", "bad-format.json"], ["format"], True, None),
    ("plan-unknown-key", [*Q, "--plan", "bad-key.json"], ["model.layers.99", "paretoq info --components"], True, None),
    ("plan-bits-5", [*Q, "--plan", "bad-bits.json"], ["5 bits", "2, 3, 4, 8"], True, None),
    ("plan-group-size-abc", [*Q, "--plan", "gs-abc.json"], ["group_size 'abc'"], True, None),
    ("plan-damp-x", [*Q, "--plan", "damp-x.json"], ["damp 'x'"], True, None),
    ("plan-damp-neg", [*Q, "--plan", "damp-neg.json"], ["damp -1"], True, None),
    ("plan-damp-nan", [*Q, "--plan", "damp-nan.json"], ["damp nan"], True, None),
    ("plan-quant-list", [*Q, "--plan", "quant-list.json"], ["\"quant\" of type list"], True, None),
    ("plan-model-type-quantize", [*Q, "--plan", "other-model.json"], ["'mixtral'", "'deepseek_v3'"], True, None),
    ("plan-model-type-eval", ["eval", "--model", "tiny", "--plan", "other-model.json", *TINY],
     ["'mixtral'", "'deepseek_v3'"], True, None),
    ("eval-gguf-junk", ["eval", "--model", "tiny", "--gguf", "junk.gguf", *TINY],
     ["junk.gguf", "not a readable GGUF file"], True, None),
    ("eval-gguf-missing", ["eval", "--model", "tiny", "--gguf", "nowhere.gguf", *TINY],
     ["nowhere.gguf", "does not exist"], True, None),
    ("plan-model-type-export", ["export", "--plan", "other-model.json", "--format", "json", "--out", "e"],
     ["'mixtral'", "'deepseek_v3'"], True, None),
    # outputs that cannot be written: refused before the work
    ("out-search", [*S[:5], "--out", "a-file/out", *TINY], ["cannot write outputs", "--out"], True, None),
    ("out-quantize", [*Q[:4], "a-file/q", *TINY, "--uniform", "4"], ["cannot write outputs", "--out"], True, None),
    ("out-export", ["export", "--plan", "good.json", "--format", "json", "--out", "a-file/e"],
     ["cannot write outputs", "--out"], True, None),
    ("out-probe", ["probe", "--model", "tiny", "--out", "a-file/p", *TINY], ["cannot write outputs", "--out"], True, None),
    ("out-quantize-exists", [*Q[:4], "ckpt", *TINY, "--uniform", "4"], ["not empty"], True, None),
    # checkpoints
    ("generate-truncated", ["generate", "--checkpoint", "ckpt-cut", "--prompt", "x", "--device", "cpu"],
     [".safetensors is truncated", "paretoq quantize"], True, None),
    ("generate-quantization-json", ["generate", "--checkpoint", "ckpt-json", "--prompt", "x", "--device", "cpu"],
     ["quantization.json is truncated", "paretoq quantize"], True, None),
    ("generate-not-a-checkpoint", ["generate", "--checkpoint", "tiny", "--prompt", "x", "--device", "cpu"],
     ["no quantization.json"], True, None),
    # lm-eval reads its task index first (tens of seconds), still before the model is loaded
    ("lm-eval-unknown-task", ["eval", "--model", "tiny", "--uniform", "4", "--lm-eval", "nosuch_task", *TINY],
     ["unknown lm-eval task 'nosuch_task'"], False, None),
]
if not torch.cuda.is_available():
    ROWS.append(("device-cuda", [*S, "--device", "cuda"], ["--device", "cuda", "no CUDA device", "--device cpu"], True, None))


@pytest.fixture(scope="module")
def import_cpu():
    """CPU seconds a child spends importing what every command imports before it can check anything."""
    code = ("import paretoq.cli, paretoq.search, paretoq.probes.run, paretoq.quant.sequential, paretoq.eval_plans, "
            "transformers.models.deepseek_v3.modeling_deepseek_v3")
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(p.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def refusals(ws):
    """Every row at once, as many at a time as there are cores, each in its own copy of the working
    directory (hard links): row id -> (exit code, stdout, stderr, CPU seconds, changed paths)."""
    def one(row):
        name, argv, _, _, pythonpath = row
        here = ws.parent / f"row-{name}"
        shutil.copytree(ws, here, copy_function=os.link, symlinks=True)
        before = snapshot(here)
        code, out, err, cpu = run(argv, here, {"PYTHONPATH": str(here / pythonpath)} if pythonpath else None)
        after = snapshot(here)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        shutil.rmtree(here)
        return name, (code, out, err, cpu, changed)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(pool.map(one, ROWS))


@pytest.mark.parametrize("name, phrases, fast", [(r[0], r[2], r[3]) for r in ROWS], ids=[r[0] for r in ROWS])
def test_refused_in_one_line(refusals, import_cpu, name, phrases, fast):
    code, out, err, cpu, changed = refusals[name]
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("paretoq: error: "), err
    assert "Traceback" not in err + out
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert "s3cret" not in err
    assert not changed, f"the output location changed: {changed}"
    if fast:
        assert cpu - import_cpu < FAST_CPU_S, f"{cpu:.1f} s of CPU before the refusal ({import_cpu:.1f} s of imports)"


def _complete_trials(db: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(db)) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _flip_bytes(path: Path) -> None:
    """Damage a file in place without changing its size."""
    data = bytearray(path.read_bytes())
    for i in (len(data) // 2, len(data) - 2):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_sigterm_then_damaged_caches_then_too_few_trials(ws, tmp_path):
    """One search, four promises: SIGTERM prints one line; the same command resumes the study
    (nothing left running, the trials kept); damaged features and sensitivity entries are
    recomputed with a one-line warning each; --trials below the baselines says so."""
    cache = tmp_path / "cache"  # this test's own, so that only its entries are damaged
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PARETOQ_CACHE": str(cache)}
    argv = ["search", "--model", str(ws / "tiny"), "--storage", f"sqlite:///{tmp_path}/s.db", "--quiet", *TINY]
    proc = subprocess.Popen([PARETOQ, *argv, "--out", str(tmp_path / "a"), "--study", "a", "--trials", "500"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + 500
    while _complete_trials(tmp_path / "s.db") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paretoq: interrupted after "), err
    assert "run the same command again to resume" in lines[0]

    entries = sorted((cache / "features").glob("*.json")) + sorted((cache / "sensitivity").glob("*.json"))
    assert {p.parent.name for p in entries} == {"features", "sensitivity"}
    for p in entries:
        _flip_bytes(p)
    kept = _complete_trials(tmp_path / "s.db")
    code, out, err, _ = run([*argv, "--out", str(tmp_path / "a"), "--study", "a", "--trials", str(kept + 1)],
                            tmp_path, {"PARETOQ_CACHE": str(cache)})
    assert code == 0, err
    import optuna

    trials = optuna.load_study(study_name="a", storage=f"sqlite:///{tmp_path}/s.db").trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == kept + 1 and "RUNNING" not in states, states
    # the knapsack is queued first, so it is verified however few trials run
    assert trials[0].user_attrs["source"] == "baseline:knapsack" and states[0] == "COMPLETE"
    warnings = [line for line in err.splitlines() if "cache entry" in line]
    assert len(warnings) == len(entries) and all("is damaged (checksum mismatch); recomputing it" in w
                                                 for w in warnings), err
    from paretoq.cache import read_checked_json

    for p in entries:
        read_checked_json(p)  # rewritten whole
    assert "Traceback" not in err
    # the resumed study may already hold a search trial (the SIGTERM lands when it lands): the
    # note about --trials below the baselines is checked on a new study of one trial
    code, out, err, _ = run([*argv, "--out", str(tmp_path / "b"), "--study", "b", "--trials", "1"],
                            tmp_path, {"PARETOQ_CACHE": str(cache)})
    assert code == 0, err
    note = [line for line in err.splitlines() if "baselines take" in line]
    assert len(note) == 1 and "the search proper did not run" in note[0] and "--trials above" in note[0], err
    assert "not verified" not in note[0] or "the knapsack, queued first, was" in note[0], note[0]
    assert "Traceback" not in err


def test_a_killed_quantize_leaves_no_checkpoint_and_the_next_run_cleans_up(ws, tmp_path):
    argv = ["quantize", "--model", str(ws / "tiny"), "--uniform", "4", "--out", str(tmp_path / "q"), "--quiet", *TINY]
    proc = subprocess.Popen([PARETOQ, *argv], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not list(tmp_path.glob(".q.*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # until the checkpoint is being written
    proc.kill()
    proc.wait()
    assert not (tmp_path / "q").exists() and len(list(tmp_path.glob(".q.*"))) == 1
    code, out, err, _ = run(argv, tmp_path)
    assert code == 0, err
    assert err.strip().startswith("paretoq: removed ") and "a partial output left by a run that was killed" in err
    assert not list(tmp_path.glob(".q.*")) and (tmp_path / "q" / "quantization.json").is_file()


# -- property: mutated inputs never give a traceback --------------------------------------------

def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


WRONG = st.sampled_from([None, "x", "", -1, 0, 1, 5, 2**70, 1e308, -1e308, math.nan, math.inf, True, [], {}, [4], {"a": 1}])


@st.composite
def mutated(draw, doc):
    """``doc`` with one key deleted, one value of the wrong type, or its JSON text cut short."""
    kind = draw(st.sampled_from(["delete", "replace", "truncate"]))
    text = json.dumps(doc)
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    doc = json.loads(text)
    paths = [p for p in _paths(doc) if p]
    path = draw(st.sampled_from(paths))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(WRONG)
    return json.dumps(doc)  # NaN and inf as JSON's extensions, as Python writes them


def _in_process(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _works_or_one_line(argv: list[str]) -> int:
    code, err = _in_process(argv)
    assert "Traceback" not in err, err
    assert code in (0, 2), err
    if code == 2:
        lines = [line for line in err.strip().splitlines() if not line.startswith("paretoq: warning:")]
        assert len(lines) == 1 and lines[0].startswith("paretoq: error: "), err
    return code


PROPERTY = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def good(ws):
    return json.loads((ws / "good.json").read_text())


@pytest.fixture(scope="module")
def small_plan(ws, good):
    """A plan of a few components, so that valid mutations evaluate and quantize in seconds."""
    keys = list(good["bits"])[:3]
    return {**good, "bits": {k: b for k, b in zip(keys, (2, 4, 8))}, "budget": 3.0,
            "metrics": {"kl": 0.04, "ppl": 3.1}}


@PROPERTY
@given(data=st.data())
def test_mutated_plans_never_give_a_traceback(ws, small_plan, tmp_path_factory, data):
    text = data.draw(mutated(small_plan))
    tmp = tmp_path_factory.mktemp("plan")
    (tmp / "plan.json").write_text(text)
    plan = str(tmp / "plan.json")
    command = data.draw(st.sampled_from(["export", "eval", "quantize"]))
    if command == "export":
        _works_or_one_line(["export", "--plan", plan, "--format", "json", "--out", str(tmp / "e"), "--model",
                            str(ws / "tiny")])
    elif command == "eval":
        _works_or_one_line(["eval", "--plan", plan, "--model", str(ws / "tiny"), "--quiet", *TINY])
    else:
        _works_or_one_line(["quantize", "--plan", plan, "--model", str(ws / "tiny"), "--out", str(tmp / "q"),
                            "--quiet", *TINY])


@PROPERTY
@given(data=st.data())
def test_mutated_fronts_never_give_a_traceback(ws, small_plan, tmp_path_factory, data):
    front = {"study": "s", "budget": 3.0,
             "front": [{"avg_bits": 2.9, "kl": 0.05, "kl_test": 0.06, "source": "surrogate", "trial": 7}],
             "baselines": [{"name": "knapsack", "avg_bits": 3.0, "kl": 0.07, "kl_test": 0.08, "trial": 3}]}
    tmp = tmp_path_factory.mktemp("front")
    (tmp / "front.json").write_text(data.draw(mutated(front)))
    command = data.draw(st.sampled_from(["export", "eval", "quantize"]))
    argv = {"export": ["export", "--format", "json", "--out", str(tmp / "e"), "--model", str(ws / "tiny")],
            "eval": ["eval", "--model", str(ws / "tiny"), "--quiet", *TINY],
            "quantize": ["quantize", "--model", str(ws / "tiny"), "--out", str(tmp / "q"), "--quiet", *TINY]}[command]
    _works_or_one_line([*argv, "--plan", str(tmp / "front.json")])


@PROPERTY
@given(data=st.data())
def test_mutated_search_spaces_never_give_a_traceback(ws, tmp_path_factory, data):
    """A search checks its space before any weight is read; --out under a file then stops it, so a
    valid mutation ends in that refusal and an invalid one in the space's."""
    import yaml

    space = yaml.safe_load((Path(__file__).parent.parent / "search_spaces" / "default.yaml").read_text())
    tmp = tmp_path_factory.mktemp("space")
    text = data.draw(mutated(space))
    (tmp / "space.yaml").write_text(text)  # JSON is YAML
    argv = ["search", "--model", str(ws / "tiny"), "--space", str(tmp / "space.yaml"), "--out",
            str(ws / "a-file" / "out"), "--storage", f"sqlite:///{tmp}/s.db", *TINY]
    assert _works_or_one_line(argv) == 2


@PROPERTY
@given(budget=st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8),
                        st.integers().map(str)))
def test_info_budgets_never_give_a_traceback(budget):
    _works_or_one_line(["info", "--budget", budget, "--json"])
