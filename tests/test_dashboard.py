"""`paretoq dashboard` and what a search publishes for optuna-dashboard, read back through the dashboard itself."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import urllib.request
from pathlib import Path

import optuna
import pytest

from paretoq import dashboard
from paretoq.cli import main
from paretoq.plan import Plan
from paretoq.search import SearchConfig, run_search
from paretoq.storage import mask_url

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses listening on ``port``, from the kernel's own table."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return found


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def get_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


class Served:
    """A `paretoq dashboard` (or any command) in a subprocess, waited on until it answers HTTP."""

    def __init__(self, argv, cwd, port):
        self.port = port
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stderr.read()}")
            try:
                get_json(f"http://127.0.0.1:{port}/api/meta")
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError("the server did not answer within 90 s")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


@pytest.fixture(scope="module")
def searched(tiny_search_model_dir, tmp_path_factory):
    """A short real search on the tiny model, run from a fresh directory as a user would."""
    cwd = tmp_path_factory.mktemp("project")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        state = run_search(SearchConfig(
            budget=3.0, model=str(tiny_search_model_dir), trials=24, round_size=8, calib_tokens=512,
            eval_tokens=512, seq_len=64, sensitivity_tokens=128, study="tiny", progress=False))
    finally:
        os.chdir(before)
    return cwd, state


@pytest.mark.slow
def test_the_study_reads_back_through_the_dashboard_api(searched):
    cwd, state = searched
    front = json.loads((cwd / "studies" / "tiny" / "front.json").read_text())
    port = free_port()
    server = Served([sys.executable, "-m", "paretoq.cli", "dashboard", "--port", str(port)], cwd, port)
    try:
        assert listening_addresses(port) == {"127.0.0.1"}
        base = f"http://127.0.0.1:{port}"
        (summary,) = get_json(f"{base}/api/studies")["study_summaries"]
        assert summary["study_name"] == "tiny"
        sid = summary["study_id"]
        study = get_json(f"{base}/api/studies/{sid}?after=0")
        assert study["objective_names"] == ["KL", "avg_bits"]
        trials = {t["number"]: t for t in study["trials"]}
        attrs = {n: {a["key"]: a["value"] for a in t["user_attrs"]} for n, t in trials.items()}
        for b in front["baselines"]:  # every baseline trial carries its name
            assert b["name"] in attrs[b["trial"]]["baselines"].split(", ")
            assert attrs[b["trial"]]["source"].startswith("baseline:")
        for n, t in trials.items():  # the dashboard reads only list-format constraints
            assert (t["constraints"][0] <= 0) == (attrs[n]["feasible"] == "True")
        graphs = {g["id"]: g["graph_object"] for g in study["plotly_graph_objects"]}
        assert set(graphs) == {"paretoq-front", "paretoq-hypervolume", "paretoq-surrogate", "paretoq-bits"}
        # the best plan as mean bits per layer and kind (a plan is one genome attribute, no parameter columns)
        heat = json.loads(graphs["paretoq-bits"])["data"][0]
        assert heat["type"] == "heatmap" and set(heat["y"]) >= {"attn", "expert", "shared"}
        labels = {a["text"] for a in json.loads(graphs["paretoq-front"])["layout"]["annotations"]}
        assert {b["name"] for b in front["baselines"]} <= {n for label in labels for n in label.split("<br>")}
        artifacts = {a["filename"]: a for a in study["artifacts"]}
        assert set(artifacts) == {"front.png", "probes.png", "report.md"}
        assert get_bytes(f"{base}/artifacts/{sid}/{artifacts['front.png']['artifact_id']}")[:4] == b"\x89PNG"
        assert get_bytes(f"{base}/artifacts/{sid}/{artifacts['report.md']['artifact_id']}").startswith(b"# paretoq")
        for p in front["front"]:  # each front trial's plan, downloadable
            (meta,) = [a for a in trials[p["trial"]]["artifacts"] if a["filename"] == "plan.json"]
            url = f"{base}/artifacts/{sid}/{trials[p['trial']]['trial_id']}/{meta['artifact_id']}"
            plan = json.loads(get_bytes(url))
            assert plan["format"] == "paretoq.plan/1" and plan["metrics"]["trial"] == p["trial"]
            assert plan["metrics"]["kl"] == pytest.approx(p["kl"]) and plan["avg_bits"] == pytest.approx(p["avg_bits"])
        note = study["note"]["body"]
        assert "Best plan per budget" in note and "| knapsack |" in note
    finally:
        out = server.stop()
    lines = out.splitlines()
    assert f"at http://127.0.0.1:{port}/dashboard/studies/{sid}" in lines[0]
    command = lines[1].removeprefix("the same by hand: ")
    assert command == (f"optuna-dashboard sqlite:///studies/paretoq.db --artifact-dir studies/tiny/artifacts "
                       f"--host 127.0.0.1 --port {port}")
    # ... and that command serves the same study with its artifacts
    argv = [str(Path(sys.executable).parent / "optuna-dashboard"), *shlex.split(command)[1:], "--quiet"]
    server = Served(argv, cwd, port)
    try:
        study = get_json(f"http://127.0.0.1:{port}/api/studies/{sid}?after=0")
        front_png = next(a for a in study["artifacts"] if a["filename"] == "front.png")
        assert get_bytes(f"http://127.0.0.1:{port}/artifacts/{sid}/{front_png['artifact_id']}")[:4] == b"\x89PNG"
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_study_page_renders_in_chromium(searched, tmp_path):
    from playwright.sync_api import sync_playwright

    cwd, _ = searched
    port = free_port()
    server = Served([sys.executable, "-m", "paretoq.cli", "dashboard", "--port", str(port)], cwd, port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                (study,) = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
                page.goto(f"http://127.0.0.1:{port}/dashboard/studies/{study['study_id']}", timeout=60_000)
                for text in ("tiny", "KL", "avg_bits", "Verified front", "uniform-2", "knapsack"):
                    page.get_by_text(text).first.wait_for(timeout=60_000)
                page.locator("[id='user-defined-plot:paretoq-front']").scroll_into_view_if_needed()
                page.screenshot(path=tmp_path / "dashboard.png")
            finally:
                browser.close()
    finally:
        server.stop()
    assert (tmp_path / "dashboard.png").read_bytes()[:4] == b"\x89PNG"


# -- fast: errors, the publisher on a synthetic study --------------------------------------------

@pytest.fixture
def storage(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    for name in ("alpha", "beta"):
        optuna.create_study(study_name=name, storage=url, directions=["minimize", "minimize"])
    return url


def test_unknown_study_lists_the_studies(storage, capsys):
    assert main(["dashboard", "--storage", storage, "--study", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope'" in err and "alpha, beta" in err and "--study" in err


def test_port_in_use(storage, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["dashboard", "--storage", storage, "--study", "alpha", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"port {port}" in err and "--port" in err


def test_no_storage_here(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["dashboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "paretoq search" in err and "--storage" in err


def test_another_host_warns_that_there_is_no_authentication(storage, monkeypatch, capsys):
    served = []
    monkeypatch.setattr(dashboard.Dashboard, "serve_forever", lambda self: served.append(self.url))
    assert main(["dashboard", "--storage", storage, "--study", "beta", "--port", "0", "--host", "127.0.0.2"]) == 0
    out, err = capsys.readouterr()
    assert "no authentication" in err and err.count("\n") == 1
    assert served[0].startswith("http://127.0.0.2:") and "--host 127.0.0.2" in out
    assert main(["dashboard", "--storage", storage, "--study", "beta", "--port", "0"]) == 0
    assert capsys.readouterr().err == ""


def test_passwords_are_masked():
    assert mask_url("postgresql://me:s3cr@t@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert mask_url("sqlite:///studies/paretoq.db") == "sqlite:///studies/paretoq.db"
    assert mask_url("redis://:pw@host:6379") == "redis://:***@host:6379"


def test_labels_never_overlap():
    points = [(3.0, -3.0 + 0.01 * i, ["+Attn+Shared+Freq"] * (1 + i % 3)) for i in range(8)]
    points += [(3.1, -2.99, ["MoQa"]), (2.0, -2.0, ["uniform-2"])]
    xr, yr = [1.75, 9.0], [-4.0, -1.5]
    spots = dashboard._label_spots(points, xr, yr)
    ux, uy = (xr[1] - xr[0]) / dashboard.PLOT_PX[0], (yr[1] - yr[0]) / dashboard.PLOT_PX[1]
    boxes = [(x, x + (8 + dashboard.CHAR_PX * max(map(len, p[2]))) * ux, y - dashboard.LINE_PX * len(p[2]) * uy / 2,
              y + dashboard.LINE_PX * len(p[2]) * uy / 2) for (x, y), p in zip(spots, points)]
    markers = [(x - 5 * ux, x + 5 * ux, y - 5 * uy, y + 5 * uy) for x, y, _ in points]
    overlap = lambda a, b: a[0] < b[1] and b[0] < a[1] and a[2] < b[3] - 1e-12 and b[2] < a[3] - 1e-12  # noqa: E731
    for i, a in enumerate(boxes):
        assert spots[i][1] >= points[i][1] - 1e-12  # a label never sits below its point
        assert not any(overlap(a, b) for b in boxes[i + 1:] + markers)


def test_publisher_on_a_synthetic_study(tmp_path, monkeypatch):
    """Plans go to trials on the front as they finish; study artifacts are replaced, never duplicated."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=url, directions=["minimize", "minimize"])
    pub = dashboard.Publisher(study, url, tmp_path / "out", adapter=None, budget=3.0, model={"name_or_path": "x"},
                              fp_ppl=10.0, baselines={"uniform-2": "0", "same-as-uniform-2": "0"})
    assert dashboard.read_last_used() == {"storage": url, "study": "s"}
    points = {0: (0.5, 2.0), 1: (0.1, 4.0), 2: (0.6, 3.0), 3: (0.05, 8.0)}  # trial 2 is dominated by trial 0

    def objective(trial):
        g = int(trial.user_attrs["genome"])  # a plan is one genome attribute (search.py)
        kl, bits = points[g]
        # the search writes the constraint, once, in the list form both Optuna and the dashboard read
        trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [bits - 3.0])
        for k, v in {"kl": kl, "avg_bits": bits, "ppl": 11.0, "agreement": 0.9, "source": "nsga2",
                     "feasible": bits <= 3.0}.items():
            trial.set_user_attr(k, v)
        pub.on_trial(trial, Plan({"k": int(bits)}))
        return kl, bits

    for g in points:
        study.enqueue_trial({}, user_attrs={"genome": str(g)})
    study.optimize(objective, n_trials=4)
    pub.on_round()
    with_plans = {t.number for t in study.trials if optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)}
    assert with_plans == {0, 1, 3}
    assert study.trials[0].user_attrs["baselines"] == "uniform-2, same-as-uniform-2"
    assert [t.constraints["0"] for t in study.trials] == [-1.0, 1.0, 0.0, 5.0]
    (tmp_path / "out" / "report.md").write_text("first")
    pub.put_study_artifact(tmp_path / "out" / "report.md")
    (tmp_path / "out" / "report.md").write_text("second")
    pub.put_study_artifact(tmp_path / "out" / "report.md")
    (meta,) = optuna.artifacts.get_all_artifact_meta(study)
    assert (pub.artifact_dir / meta.artifact_id).read_text() == "second"
    from optuna_dashboard import get_note

    rows = [line for line in get_note(study).splitlines() if line.startswith("| ") and "nsga2" in line]
    assert rows == ["| 2 | 0 | nsga2 | 2.000 | 0.5 | 11.000 |", "| **3** | 0 | nsga2 | 2.000 | 0.5 | 11.000 |",
                    "| 4 | 1 | nsga2 | 4.000 | 0.1 | 11.000 |", "| 8 | 3 | nsga2 | 8.000 | 0.05 | 11.000 |"]


def test_without_optuna_dashboard_the_search_still_publishes_plans(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dashboard, "dashboard_installed", lambda: False)
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=url, directions=["minimize", "minimize"])
    pub = dashboard.Publisher(study, url, tmp_path / "out", adapter=None, budget=3.0, model={}, fp_ppl=1.0,
                              baselines={})

    def objective(trial):
        for k, v in {"kl": 0.1, "avg_bits": 2.5, "ppl": 1.1, "agreement": 0.9, "source": "nsga2"}.items():
            trial.set_user_attr(k, v)
        pub.on_trial(trial, Plan({"k": 2}))
        return 0.1, 2.5

    study.optimize(objective, n_trials=1)
    pub.on_round()
    assert optuna.artifacts.get_all_artifact_meta(study.trials[0], storage=study._storage)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert not [k for k in attrs if k.startswith("dashboard:")]  # no figure, no note
    assert main(["dashboard", "--storage", url]) == 2
    assert "pip install 'paretoq[dashboard]'" in capsys.readouterr().err


def test_label_spots_end_when_rounding_would_keep_a_box_clashing():
    """Found in CI: a label moved to just above a clashing box (y = top + h/2) can, in floating point,
    still reach a hair below that top, clash with the same box again and loop forever. Built here
    with a marker whose top rounds that way; the label must end clear of it."""
    from paretoq.dashboard import LINE_PX, PLOT_PX, _label_spots

    xrange, yrange = [0.0, float(PLOT_PX[0])], [-0.8, 0.0]
    uy = (yrange[1] - yrange[0]) / PLOT_PX[1]
    h = LINE_PX * uy
    # a marker height whose box top m has (m + h/2) - h/2 < m (600 of these 200,001 heights do)
    my = next(y for y in np.linspace(-0.8, 0.0, 200001) if (y + 5 * uy + h / 2) - h / 2 < y + 5 * uy)
    point = (0.0, float(my), ["a"])  # its label starts at x = 14 px, right over the marker at x = 20 px
    (lx, ly), = _label_spots([point], xrange, yrange, [(20.0, float(my))])
    assert ly - h / 2 >= my + 5 * uy  # above the marker's box
