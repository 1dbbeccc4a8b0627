"""A study in optuna-dashboard: what `paretoq search` publishes into its study, and `paretoq dashboard`.

While a search runs, a :class:`Publisher` writes into the study what optuna-dashboard 0.21 shows:

- per trial (while it runs; Optuna refuses to change a finished trial): a
  ``baselines`` user attribute naming every baseline with this trial's bits; and ``plan.json`` as an
  artifact when the trial is on the verified front at the moment it finishes. A trial on the final
  front was on the front of every earlier moment, so every final front trial has one;
- after each round: four plotly figures (the verified front with every baseline labelled, the
  hypervolume history, the surrogate's predicted vs measured KL, the best plan's bits by layer and
  kind: a plan is one ``genome`` attribute, not thousands of parameter columns) and the study note (the best plan
  per budget, the baselines table);
- at the end: ``front.png``, ``probes.png`` and ``report.md`` as study artifacts.

Artifacts live in Optuna's ``FileSystemArtifactStore`` under ``<out>/artifacts``. Figures and the note
need the ``dashboard`` extra (optuna-dashboard, plotly); without it they are skipped, the rest is
Optuna's own. The budget constraint is written by the search itself, once per trial, in the list
form the dashboard's Pareto-front view reads to grey out plans over the budget.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import socket
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.trial import TrialState

from paretoq import report
from paretoq.cache import atomic_write, atomic_write_text
from paretoq.errors import ParetoqError
from paretoq.plan import Plan
from paretoq.storage import DEFAULT_STORAGE, mask_url

# `paretoq dashboard` with no --storage/--study opens what `paretoq search` used last in this directory.
LAST_USED = Path("studies") / "last-search.json"
ARTIFACT_DIR_ATTR = "paretoq:artifact_dir"  # study system attribute: where the study's artifacts live
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# optuna-dashboard draws each figure in a 450 px high box: the legend goes inside the plot.
LAYOUT = {"height": 450, "margin": {"l": 60, "r": 20, "t": 40, "b": 45}, "title_font_size": 14,
          "legend": {"x": 0.99, "xanchor": "right", "y": 0.99, "bgcolor": "rgba(255,255,255,0.7)", "font_size": 10}}
BIT_TICKS = [2, 2.5, 3, 3.5, 4, 5, 6, 8]
PLOT_PX = (580, 345)  # the plot area inside that box at a usual window width (a little less), for labels
LINE_PX, CHAR_PX = 14, 6.5  # a line and a character of 10 px text, with a margin
COLORS = {"plan": "#bbbbbb", "over": "#e7298a", "front": "#1b9e77", "baseline": "#d95f02", "best": "#7570b3"}


def dashboard_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("optuna_dashboard", "plotly"))


def record_last_used(storage: str, study: str) -> None:
    atomic_write_text(LAST_USED, json.dumps({"storage": storage, "study": study}, indent=1) + "\n")
    if mask_url(storage) != storage:  # the URL holds a password: keep the record to its owner
        os.chmod(LAST_USED, 0o600)


def read_last_used() -> dict | None:
    try:
        return json.loads(LAST_USED.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _dominated(point: tuple[float, float], trials) -> bool:
    return any(t.values[0] <= point[0] and t.values[1] <= point[1] and tuple(t.values) != point for t in trials)


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


class Publisher:
    """Writes what optuna-dashboard shows of a study while `paretoq search` runs (see the module docstring)."""

    def __init__(self, study: optuna.Study, storage: str, out: Path, adapter, budget: float, model: dict,
                 fp_ppl: float, baselines: dict[str, str], groups=None):
        self.study, self.adapter, self.budget, self.model, self.fp_ppl = study, adapter, budget, model, fp_ppl
        self.baseline_genomes = baselines  # baseline name -> the genome it was enqueued with
        self.groups = groups
        self.out = Path(out)
        self.artifact_dir = (self.out / "artifacts").resolve()
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        self.store = FileSystemArtifactStore(self.artifact_dir)
        study._storage.set_study_system_attr(study._study_id, ARTIFACT_DIR_ATTR, str(self.artifact_dir))
        record_last_used(storage, study.study_name)
        self.plotting = dashboard_installed()

    def baseline_trials(self, done: list[optuna.trial.FrozenTrial] | None = None) -> dict[str, int]:
        """Baseline name -> number of the first completed trial with its bits (several names may share one)."""
        done = _completed(self.study) if done is None else done
        names = {}
        for name, genome in self.baseline_genomes.items():
            match = next((t for t in done if t.user_attrs.get("genome") == genome), None)
            if match is not None:
                names[name] = match.number
        return names

    def on_trial(self, trial: optuna.Trial, plan: Plan) -> None:
        """Call at the end of the objective, after the trial's user attributes are set."""
        a = trial.user_attrs
        names = [n for n, g in self.baseline_genomes.items() if g == a.get("genome")]
        if names:
            trial.set_user_attr("baselines", ", ".join(names))
        if _dominated((a["kl"], a["avg_bits"]), _completed(self.study)):
            return
        full = Plan(plan.bits, plan.quant, model=self.model, budget=self.budget,
                    metrics={"kl": a["kl"], "ppl": a["ppl"], "ppl_fp": self.fp_ppl, "agreement": a["agreement"],
                             "trial": trial.number, "source": a["source"]})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "plan.json"
            full.save(path, self.adapter)
            upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial)

    def on_round(self) -> None:
        """Refresh the figures and the note (a fraction of a second)."""
        done = _completed(self.study)
        if not self.plotting or not done:
            return
        from optuna_dashboard import save_note, save_plotly_graph_object

        summary = report.study_front(self.study, self.baseline_trials(done), self.budget, done=done)
        figures = {"paretoq-front": front_figure(done, summary), "paretoq-hypervolume": hypervolume_figure(self.study, done),
                   "paretoq-surrogate": surrogate_figure(done), "paretoq-bits": self.bits_figure(done)}
        for graph_id, fig in figures.items():
            if fig is not None:
                save_plotly_graph_object(self.study, fig, graph_object_id=graph_id)
        save_note(self.study, study_note(self.study, done, summary))

    def bits_figure(self, done):
        """The best plan within the budget as a heatmap of mean bits per layer and kind."""
        best = min((t for t in done if t.user_attrs.get("feasible")), key=lambda t: t.values[0], default=None)
        if best is None or self.groups is None or "genome" not in best.user_attrs:
            return None
        import plotly.graph_objects as go

        from paretoq.space import decode_genome

        genome = decode_genome(best.user_attrs["genome"])
        layers = sorted({g.layer for g in self.groups})
        kinds = sorted({g.kind for g in self.groups})
        num, den = np.zeros((len(kinds), len(layers))), np.zeros((len(kinds), len(layers)))
        for g, i in zip(self.groups, genome):
            r, c = kinds.index(g.kind), layers.index(g.layer)
            num[r, c] += g.params * g.choices[int(i)]
            den[r, c] += g.params
        z = np.where(den > 0, num / np.maximum(den, 1), np.nan)
        fig = go.Figure(go.Heatmap(z=z, x=layers, y=kinds, colorscale="Viridis", zmin=2, zmax=8,
                                   colorbar={"title": "bits"}, hovertemplate="layer %{x}, %{y}: %{z:.2f} bits<extra></extra>"))
        fig.update_layout(title=f"Best plan (trial {best.number}): mean bits by layer and kind", xaxis_title="layer",
                          yaxis_title="kind", **{k: v for k, v in LAYOUT.items() if k != "legend"})
        return fig

    def on_finish(self, features) -> None:
        """Call after ``report.write_outputs``: the final figures and note; its outputs as study artifacts."""
        from paretoq.probes.plot import plot_features

        self.on_round()
        self.put_study_artifact(self.out / "front.png")
        self.put_study_artifact(self.out / "report.md")
        if features is not None and "probes.png" not in self._study_artifacts():  # the probes do not change within a study
            with tempfile.TemporaryDirectory() as tmp:
                plot_features(features, Path(tmp) / "probes.png")
                self.put_study_artifact(Path(tmp) / "probes.png")

    def _study_artifacts(self) -> dict[str, str]:
        return {m.filename: m.artifact_id for m in get_all_artifact_meta(self.study)}

    def put_study_artifact(self, path: Path) -> None:
        """Upload ``path`` once per study; later calls replace the file's content under the same artifact id."""
        artifact_id = self._study_artifacts().get(path.name)
        if artifact_id is None:
            upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=self.study)
        else:
            atomic_write(self.artifact_dir / artifact_id, lambda tmp: shutil.copyfile(path, tmp))


# -- figures and the note ------------------------------------------------------------------------

def _log(v: float) -> float:
    return math.log10(max(v, 1e-12))  # a KL of 0 (or rounding below it) still gets a place on a log axis


def _hover(t: optuna.trial.FrozenTrial) -> str:
    a = t.user_attrs
    return (f"trial {t.number} ({a.get('source')})<br>KL {t.values[0]:.4g}, {t.values[1]:.3f} bits, "
            f"perplexity {a.get('ppl', math.nan):.3f}")


def front_figure(done, summary: dict):
    """KL against average bits: every verified plan, the front, the baselines by name, the budget."""
    import plotly.graph_objects as go

    budget = summary["budget"]
    by_number = {t.number: t for t in done}
    fig = go.Figure()
    for name, trials, color, symbol in (
            ("verified plans", [t for t in done if t.user_attrs.get("feasible")], COLORS["plan"], "circle"),
            ("over the budget", [t for t in done if not t.user_attrs.get("feasible")], COLORS["over"], "circle-open")):
        fig.add_scatter(x=[t.values[1] for t in trials], y=[t.values[0] for t in trials], mode="markers", name=name,
                        marker={"color": color, "size": 6, "symbol": symbol}, hovertext=[_hover(t) for t in trials],
                        hoverinfo="text")
    front = [by_number[p["trial"]] for p in summary["front"]]
    fig.add_scatter(x=[t.values[1] for t in front], y=[t.values[0] for t in front], mode="lines+markers",
                    name="verified front", line={"shape": "hv", "color": COLORS["front"]}, marker={"size": 7},
                    hovertext=[_hover(t) for t in front], hoverinfo="text")
    names = defaultdict(list)  # trial -> the baselines it is
    for b in summary["baselines"]:
        names[b["trial"]].append(b["name"])
    base = sorted((by_number[n] for n in names), key=lambda t: (t.values[1], -t.values[0]))
    fig.add_scatter(x=[t.values[1] for t in base], y=[t.values[0] for t in base], mode="markers", name="baselines",
                    marker={"color": COLORS["baseline"], "size": 9, "symbol": "x"},
                    hovertext=[", ".join(names[t.number]) + "<br>" + _hover(t) for t in base], hoverinfo="text")
    # Heuristics matched to one budget pile up at the same bits: labels are stacked so that none covers another.
    # Both axes are logarithmic (2-4 bits get half the width, 8 bits stays in view), and plotly places
    # annotations on a log axis in log10 units.
    xs, ys = [_log(t.values[1]) for t in done], [_log(t.values[0]) for t in done]
    span = max(max(ys) - min(ys), 0.5)
    xrange = [min(xs) - 0.03, max(xs) + 0.09]  # room on the right for the last label
    yrange = [min(ys) - 0.08 * span, max(ys) + 0.4 * span]  # room above for stacked labels
    points = [(_log(t.values[1]), _log(t.values[0]), names[t.number]) for t in base]
    for (x, y, label), (lx, ly) in zip(points, _label_spots(points, xrange, yrange, list(zip(xs, ys)))):
        fig.add_annotation(x=x, y=y, ax=lx, ay=ly, axref="x", ayref="y", text="<br>".join(label), showarrow=True,
                           arrowwidth=0.6, arrowcolor="#999999", font={"size": 10}, xanchor="left", align="left")
    best = min((t for t in done if t.user_attrs.get("feasible")), key=lambda t: t.values[0], default=None)
    if best is not None:
        fig.add_scatter(x=[best.values[1]], y=[best.values[0]], mode="markers", hovertext=[_hover(best)],
                        hoverinfo="text", name=f"best within budget (trial {best.number}, KL {best.values[0]:.3g})",
                        marker={"color": COLORS["best"], "size": 16, "symbol": "star"})
    fig.add_vline(x=budget, line={"dash": "dash", "color": COLORS["best"], "width": 1})
    fig.update_layout(title=f"Verified front: {len(done)} plans, budget {budget:g} bits",
                      xaxis_title="average bits per weight", yaxis_title="KL(fp || plan) per token", xaxis_type="log",
                      yaxis_type="log", xaxis_range=xrange, yaxis_range=yrange, xaxis_tickvals=BIT_TICKS, **LAYOUT)
    return fig


def _label_spots(points: list[tuple[float, float, list[str]]], xrange, yrange,
                 markers: list[tuple[float, float]] = ()) -> list[tuple[float, float]]:
    """Where to put each point's label (lines of text), in axis units: right of the point, as low as it can go
    without covering a marker (the points' own and ``markers``) or a label placed before it (lowest first)."""
    ux, uy = (xrange[1] - xrange[0]) / PLOT_PX[0], (yrange[1] - yrange[0]) / PLOT_PX[1]  # axis units per pixel
    boxes = [(x - 5 * ux, x + 5 * ux, y - 5 * uy, y + 5 * uy) for x, y in [p[:2] for p in points] + list(markers)]
    spots: dict[int, tuple[float, float]] = {}
    for i in sorted(range(len(points)), key=lambda i: points[i][1]):
        x, y, lines = points[i]
        x0, w, h = x + 14 * ux, (8 + CHAR_PX * max(map(len, lines))) * ux, LINE_PX * len(lines) * uy
        for _ in range(len(boxes) + 1):  # each move clears at least one box, so this many moves suffice
            clash = [b for b in boxes if b[0] < x0 + w and x0 < b[1] and b[2] < y + h / 2 and y - h / 2 < b[3]]
            if not clash:
                break
            # Just above the highest clashing box; the margin keeps rounding from leaving the new box a hair
            # below it (y - h/2 < top again), which made this loop spin forever.
            y = max(b[3] for b in clash) + h / 2 + 1e-6 * max(h, uy, 1e-12)
        boxes.append((x0, x0 + w, y - h / 2, y + h / 2))
        spots[i] = (x0, y)
    return [spots[i] for i in range(len(points))]


def hypervolume_figure(study: optuna.Study, done):
    """Hypervolume of the feasible front after each trial (optuna-dashboard has no such view)."""
    feasible = [t.values[0] for t in done if t.user_attrs.get("feasible")]
    if not feasible:
        return None
    ref = [1.1 * max(feasible), max(t.values[1] for t in done)]
    with warnings.catch_warnings():  # experimental since Optuna 3.3
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fig = optuna.visualization.plot_hypervolume_history(study, reference_point=ref)
    fig.update_traces(line={"color": COLORS["front"]}, marker={"size": 4})
    fig.update_layout(title=f"Hypervolume of the feasible front (reference: KL {ref[0]:.3g}, {ref[1]:g} bits)",
                      xaxis_title="trial", yaxis_title="hypervolume (KL x bits)", **LAYOUT)
    return fig


def surrogate_figure(done):
    """The surrogate's predicted KL against the measured KL of every trial it scored."""
    import plotly.graph_objects as go

    from paretoq.surrogate import kendall_tau

    scored = [t for t in done if t.user_attrs.get("predicted_kl") is not None]
    if not scored:
        return None
    fig = go.Figure()
    lo = min(min(t.values[0], t.user_attrs["predicted_kl"]) for t in scored)
    hi = max(max(t.values[0], t.user_attrs["predicted_kl"]) for t in scored)
    fig.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="predicted = measured",
                    line={"dash": "dot", "color": "#999999"}, hoverinfo="skip")
    proposals = [t for t in scored if t.user_attrs.get("source") == "surrogate"]
    others = [t for t in scored if t.user_attrs.get("source") != "surrogate"]
    for name, trials, color in (("surrogate proposals (predicted before verification)", proposals, COLORS["front"]),
                                ("baselines and NSGA-II trials", others, COLORS["plan"])):
        fig.add_scatter(x=[t.user_attrs["predicted_kl"] for t in trials], y=[t.values[0] for t in trials],
                        mode="markers", name=name, marker={"color": color, "size": 6},
                        hovertext=[f"predicted {t.user_attrs['predicted_kl']:.4g}<br>{_hover(t)}" for t in trials],
                        hoverinfo="text")
    tau = kendall_tau([t.user_attrs["predicted_kl"] for t in proposals], [t.values[0] for t in proposals])
    title = "Surrogate: predicted vs measured KL"
    if not math.isnan(tau):
        title += f" (Kendall tau {tau:.2f} on {len(proposals)} proposals)"
    fig.update_layout(title=title, xaxis_title="predicted KL", yaxis_title="measured KL", xaxis_type="log",
                      yaxis_type="log", **{**LAYOUT, "legend": {**LAYOUT["legend"], "x": 0.01, "xanchor": "left"}})
    return fig


def best_per_budget(done, budget: float, step: float = 0.25) -> list[tuple[float, optuna.trial.FrozenTrial]]:
    """(budget, lowest-KL verified plan within it) every ``step`` bits where the plan changes, and at ``budget``."""
    lo, hi = min(t.values[1] for t in done), max(t.values[1] for t in done)
    levels = sorted({*np.arange(math.ceil(lo / step - 1e-9) * step, hi + step / 2, step).round(6).tolist(), budget})
    rows: list[tuple[float, optuna.trial.FrozenTrial]] = []
    for level in levels:
        within = [t for t in done if t.values[1] <= level + 1e-9]
        if not within:
            continue
        best = min(within, key=lambda t: t.values[0])
        if not rows or rows[-1][1].number != best.number or level == budget:
            rows.append((level, best))
    return rows


def study_note(study: optuna.Study, done, summary: dict) -> str:
    budget = summary["budget"]
    feasible = [t for t in done if t.user_attrs.get("feasible")]
    model = study.user_attrs.get("model", "?")
    lines = [f"## paretoq study `{study.study_name}`", "",
             f"Model `{model}`, budget **{budget:g}** average bits per weight: {len(done)} verified plans, "
             f"{len(feasible)} within the budget. Plans over the budget are grey in the Pareto-front view and "
             "have `feasible` False.", ""]
    best = min(feasible, key=lambda t: t.values[0], default=None)
    if best is not None:
        lines += [f"**Best plan within the budget**: trial {best.number} ({best.user_attrs.get('source')}), "
                  f"KL {best.values[0]:.4g} at {best.values[1]:.3f} bits, perplexity "
                  f"{best.user_attrs.get('ppl', math.nan):.3f}. Its `plan.json` is among the trial's artifacts.", ""]
    lines += ["### Best plan per budget", "", "| budget (avg bits at most) | trial | source | avg bits | KL | perplexity |",
              "| --- | --- | --- | --- | --- | --- |"]
    for level, t in best_per_budget(done, budget):
        mark = "**" if level == budget else ""
        lines.append(f"| {mark}{level:g}{mark} | {t.number} | {t.user_attrs.get('source')} | {t.values[1]:.3f} | "
                     f"{t.values[0]:.4g} | {t.user_attrs.get('ppl', math.nan):.3f} |")
    lines += ["", "### Baselines", ""]
    lines += report.baselines_table(summary["baselines"], best.values[0] if best is not None else math.nan)
    lines += ["", "Written by `paretoq search` after each round; edits made here are replaced at the next round."]
    return "\n".join(lines) + "\n"


# -- serving: `paretoq dashboard` ----------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    storage: str
    study: str
    study_id: int
    artifact_dir: Path | None


def resolve(study: str | None = None, storage: str | None = None) -> Target:
    """The storage and study to serve: the ones given, else those `paretoq search` used last here."""
    last = read_last_used() or {}
    url = storage or last.get("storage")
    if url is None:
        url = DEFAULT_STORAGE
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ParetoqError(f"no study storage at {url.removeprefix('sqlite:///')}; run `paretoq search` here first "
                           f"or pass --storage URL")
    from sqlalchemy.exc import SQLAlchemyError

    try:
        rdb = optuna.storages.get_storage(url)
        names = optuna.get_all_study_names(storage=rdb)
    except ImportError as exc:  # the database driver (psycopg2 for PostgreSQL) is not installed
        cause = exc.__cause__ or exc.__context__  # Optuna re-raises the driver's own ImportError
        found = re.search(r"No module named '([^'.]+)", f"{exc} {cause}")
        name = exc.name or getattr(cause, "name", None) or (found.group(1) if found else "the database driver")
        raise ParetoqError(f"storage {mask_url(url)} needs the Python package {name!r}; "
                           f"pip install {'psycopg2-binary' if name == 'psycopg2' else name}") from None
    except (SQLAlchemyError, ValueError) as exc:  # a malformed URL, no database server
        raise ParetoqError(f"cannot open storage {mask_url(url)} ({type(exc).__name__}); "
                           f"pass --storage a database URL such as sqlite:///studies/paretoq.db") from None
    if not names:
        raise ParetoqError(f"storage {mask_url(url)} holds no study; run `paretoq search` first")
    name = study or (last.get("study") if last.get("storage") == url else None)
    if name is None and len(names) == 1:
        name = names[0]
    if name is None:
        raise ParetoqError(f"storage {mask_url(url)} holds several studies ({', '.join(names)}); "
                           f"pass --study NAME")
    if name not in names:
        raise ParetoqError(f"no study {name!r} in {mask_url(url)}; its studies: {', '.join(names)}; "
                           f"pass --study with one of them")
    study_id = rdb.get_study_id_from_name(name)
    artifact_dir = rdb.get_study_system_attrs(study_id).get(ARTIFACT_DIR_ATTR)
    return Target(url, name, study_id, Path(artifact_dir) if artifact_dir and Path(artifact_dir).is_dir() else None)


def command_line(target: Target, host: str, port: int) -> str:
    """The optuna-dashboard command that serves the same thing."""
    args = ["optuna-dashboard", mask_url(target.storage)]
    if target.artifact_dir is not None:
        args += ["--artifact-dir", os.path.relpath(target.artifact_dir)]
    return shlex.join(args + ["--host", host, "--port", str(port)])


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@dataclass
class Dashboard:
    target: Target
    url: str
    command: str
    server: WSGIServer

    def serve_forever(self) -> None:
        try:
            self.server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C is how a user stops it
            pass
        finally:
            self.server.server_close()


def open_dashboard(study: str | None = None, storage: str | None = None, host: str = "127.0.0.1",
                   port: int = 8080) -> Dashboard:
    """Bind optuna-dashboard's WSGI app to ``host:port`` for the study; ``serve_forever()`` serves it."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:  # 0: any free port
        raise ParetoqError(f"port {port!r} is out of range; pass --port from 1 to 65535 (0: any free port)")
    if not dashboard_installed():
        raise ParetoqError("optuna-dashboard is not installed; pip install 'paretoq[dashboard]'")
    from optuna_dashboard import wsgi

    target = resolve(study, storage)
    store = FileSystemArtifactStore(target.artifact_dir) if target.artifact_dir is not None else None
    app = wsgi(optuna.storages.get_storage(target.storage), artifact_store=store)
    server_class = _Server
    if ":" in host:
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    try:
        server = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ParetoqError(f"port {port} is in use on {host}; pass --port with a free port") from None
        raise ParetoqError(f"cannot listen on {host}:{port} ({exc.strerror}); pass --host 127.0.0.1") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_address[1]}/dashboard/studies/{target.study_id}"
    return Dashboard(target, url, command_line(target, host, server.server_address[1]), server)


def no_auth_warning(host: str) -> str | None:
    if host in LOOPBACK:
        return None
    return (f"warning: the dashboard has no authentication; anyone who can reach {host} can read and change "
            f"the study (pass --host 127.0.0.1 to keep it to this machine)")
