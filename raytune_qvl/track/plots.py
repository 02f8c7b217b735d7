"""The sweep's pictures: optimization history, parameter importances, parallel coordinates,
every trial's learning curve and the metric against cost, as PNGs and one interactive HTML report on the parent run."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

__all__ = ["sweep_study", "log_sweep_plots", "figures", "cost_front_figure"]

log = logging.getLogger("raytune_qvl")


def _param_values(record: Any) -> dict[str, Any]:
    """The four priority parameters of a trial as it trained (the scaled learning rate)."""
    point = {**record.point, **record.sampled}
    values: dict[str, Any] = {}
    lr = record.overrides.get("training.learning_rate", point.get("training.learning_rate"))
    if lr is not None:
        values["learning_rate"] = float(lr)
    for key, name in (
        ("lora.r", "lora_rank"),
        ("effective_batch", "effective_batch"),
        ("training.num_epochs", "epochs"),
    ):
        if key in point:
            values[name] = int(point[key])
    return values


def sweep_study(records: list[Any], mode: str) -> Any:
    """Every full-budget trial of every stage (confirmation runs included) in one in-memory Optuna
    study (with each trial's full point, fixed values included), so importances and coordinates span
    the whole sweep; a trial ASHA stopped has a value of a shorter budget, which no other is compared with."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    scored = [
        r
        for r in records
        if r.value is not None and math.isfinite(r.value) and r.status in ("completed", "confirmation")
    ]
    points = [(_param_values(r), r.value) for r in scored]
    names = sorted({k for p, _ in points for k in p})
    dists: dict[str, Any] = {}
    for name in names:
        values = [p[name] for p, _ in points if name in p]
        if name == "learning_rate":
            low, high = min(values), max(values)
            dists[name] = FloatDistribution(low, high * (1 + 1e-9) if high == low else high, log=True)
        else:
            dists[name] = CategoricalDistribution(sorted(set(values)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for params, value in points:
        if set(params) == set(names):
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    return study


def figures(space: Any, records: list[Any]) -> dict[str, Any]:
    """matplotlib figures by artifact name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, Any] = {}
    stages = sorted({r.stage for r in records})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(stages)}
    trained = [r for r in records if r.status != "reused" and not r.origin]  # this sweep's own trials

    # optimization history: every trial's value in launch order, the best full-budget search trial so far
    fig, ax = plt.subplots(figsize=(8, 4.5))
    best, xs, bests, failed = None, [], [], []
    for i, r in enumerate(trained):
        if r.value is None:
            failed.append(i)
            continue
        marker = "o" if r.status == "completed" else "v"
        ax.scatter(i, r.value, color=colors[r.stage], marker=marker, label=r.stage)
        if r.status != "completed":  # stopped by ASHA (a shorter budget) or a confirmation run: never the best
            continue
        best = r.value if best is None else (min(best, r.value) if space.mode == "min" else max(best, r.value))
        xs.append(i)
        bests.append(best)
    ax.step(xs, bests, where="post", color="black", linewidth=1, label="best so far")
    for i in failed:  # no value to plot: mark the trial on the axis instead
        ax.axvline(i, color="grey", linestyle=":", linewidth=1)
        ax.annotate(
            "failed", (i, 1), xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=7, color="grey"
        )
    _legend_once(ax)
    ax.set_xlabel("trial (launch order); triangles: stopped by ASHA (never the best so far)")
    ax.set_ylabel(space.metric)
    ax.set_title(f"{space.name}: optimization history")
    out["plots/optimization_history.png"] = fig

    # learning curves: the metric against training samples seen
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in trained:
        rows = [
            h
            for h in r.history
            if h.get(space.metric) is not None
            and not (isinstance(h.get(space.metric), float) and math.isnan(h[space.metric]))
        ]
        if rows:
            ax.plot(
                [h.get("samples_seen", 0) for h in rows],
                [h[space.metric] for h in rows],
                color=colors[r.stage],
                linestyle="-" if r.status == "completed" else "--",
                alpha=0.8,
                label=r.stage,
            )
    _legend_once(ax)
    ax.set_xlabel("training samples seen (dashed: stopped by ASHA)")
    ax.set_ylabel(space.metric)
    ax.set_title(f"{space.name}: learning curves of every trial")
    out["plots/learning_curves.png"] = fig

    study = sweep_study(records, space.mode)
    if len(study.trials) >= 2:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                importances = optuna.importance.get_param_importances(study)
                fig, ax = plt.subplots(figsize=(6, 3.5))
                names = list(importances)[::-1]
                ax.barh(names, [importances[n] for n in names], color="tab:blue")
                ax.set_xlabel("importance (fANOVA, over all trials)")
                ax.set_title(f"{space.name}: parameter importances for {space.metric}")
                fig.tight_layout()
                out["plots/param_importances.png"] = fig
            except (RuntimeError, ValueError, ZeroDivisionError) as exc:
                log.info("parameter importances skipped: %s", exc)
            axes = optuna.visualization.matplotlib.plot_parallel_coordinate(study)
            axes.set_title(f"{space.name}: parallel coordinates ({space.metric})")
            out["plots/parallel_coordinates.png"] = axes.figure
    return out


def _html_report(space: Any, records: list[Any]) -> str:
    """One self-contained interactive page (plotly embedded once: the UI may be offline)."""
    import optuna.visualization as vis
    import plotly.graph_objects as go

    study = sweep_study(records, space.mode)
    figs = []
    curves = go.Figure()
    for r in records:
        rows = [h for h in r.history if h.get(space.metric) is not None]
        if rows:
            curves.add_trace(
                go.Scatter(
                    x=[h.get("samples_seen", 0) for h in rows],
                    y=[h[space.metric] for h in rows],
                    mode="lines+markers",
                    name=f"{r.trial_id} ({r.stage}, {r.status})",
                )
            )
    curves.update_layout(title="Learning curves", xaxis_title="training samples seen", yaxis_title=space.metric)
    figs.append(curves)
    if len(study.trials) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            figs.append(vis.plot_optimization_history(study))
            figs.append(vis.plot_parallel_coordinate(study))
            try:
                figs.append(vis.plot_param_importances(study))
            except (RuntimeError, ValueError, ZeroDivisionError):
                pass
    parts = [
        f"<html><head><meta charset='utf-8'><title>{space.name} sweep</title></head><body><h2>Sweep {space.name}</h2>"
    ]
    for i, fig in enumerate(figs):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    return "".join(parts)


def cost_front_figure(front: dict[str, Any]) -> Any:
    """The metric against the chosen cost of every full-budget config (CostFront.to_dict()): the
    front as a line, the band within the tolerance of the best shaded, the best and the cheapest
    config within it marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measure, metric = front["measure"], front["metric"]
    configs = {c["trial"]: c for c in front["configs"]}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = [c["cost"][measure] for c in configs.values()]
    ax.scatter(xs, [c["value"] for c in configs.values()], color="tab:grey", alpha=0.7, label="config")
    on = [configs[t] for t in front["front"]]
    ax.step([c["cost"][measure] for c in on], [c["value"] for c in on], where="post", color="tab:blue", label="front")
    best, cheap = configs[front["best"]], configs[front["cheapest_within"]]
    ax.axhspan(min(best["value"], front["limit"]), max(best["value"], front["limit"]), color="tab:green", alpha=0.12,
               label=f"within {front['within']:.0%} of the best")  # fmt: skip
    ax.scatter([best["cost"][measure]], [best["value"]], marker="*", s=220, color="tab:red", label="best", zorder=3)
    ax.scatter([cheap["cost"][measure]], [cheap["value"]], marker="D", s=90, facecolors="none", edgecolors="black",
               linewidths=1.5, label=f"cheapest within {front['within']:.0%}", zorder=4)  # fmt: skip
    for c in on:
        ax.annotate(c["trial"], (c["cost"][measure], c["value"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(measure.replace("_", " ") + " (confirmed configs: the mean over their runs)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def log_sweep_plots(tracker: Any, run_id: str, space: Any, records: list[Any], front: dict | None = None) -> None:
    """Every picture of `figures` as a PNG (and the cost front's, given CostFront.to_dict()) and the
    interactive report, on the parent run."""
    import matplotlib.pyplot as plt

    pictures = figures(space, records)
    if front is not None:
        pictures["plots/cost_front.png"] = cost_front_figure(front)
    for name, fig in pictures.items():
        tracker.log_figure(run_id, fig, name)
        plt.close(fig)
    tracker.log_text(run_id, _html_report(space, records), "plots/sweep_report.html")


def _legend_once(ax) -> None:
    """A legend with one entry per label (each trial's line carries its stage's label)."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
