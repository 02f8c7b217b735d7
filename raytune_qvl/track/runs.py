"""What a run and a sweep log to MLflow besides their metrics: params (the flattened resolved
config and derived numbers), the resolved config files, the data audit, the label-mask view and
the predictions table. Written from the driver (one writer) through the Tracker."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from raytune_qvl.config.overrides import flatten
from raytune_qvl.config.schema import test_metric
from raytune_qvl.config.write import write_configs
from raytune_qvl.track.tracker import TAG_BOUNDARY, TAG_CHEAPEST, TAG_KIND, TAG_STRATEGY, TAG_SWEEP_DIR, Tracker
from raytune_qvl.track.views import label_mask_html, predictions_html

__all__ = [
    "open_training_run",
    "log_inputs",
    "log_audit",
    "log_predictions",
    "log_training_outputs",
    "log_sweep_start",
    "log_stage_best",
    "log_sweep_result",
]

log = logging.getLogger("raytune_qvl")


def open_training_run(tracker: Tracker, cfg: Any, pre: Any, previous: str | None) -> str:
    """The run of this output folder: `previous` reopened when it is still in the store (a
    resumed run continues its MLflow run), else a new run with its inputs logged."""
    if previous and tracker.reopen(previous):
        log.info("continuing MLflow run %s", previous)
        return previous
    run_id = tracker.start_run(cfg.output.run_name or Path(cfg.output.dir).name, {TAG_KIND: "train"})
    log_inputs(tracker, run_id, cfg, pre)
    return run_id


def log_training_outputs(tracker: Tracker, run_id: str, final_dir: Path, predictions: Path) -> None:
    """The final adapter folder and the predictions behind the best checkpoint."""
    if final_dir.is_dir():
        tracker.log_artifact(run_id, final_dir, "final")
    log_predictions(tracker, run_id, predictions)


def log_inputs(tracker: Tracker, run_id: str, cfg: Any, pre: Any) -> None:
    """Params (the flattened resolved config), resolved config files, the filled DeepSpeed
    JSON, the data audit (metrics + artifact) and the label-mask view. `pre`: the run's Preflight."""
    params = flatten({**cfg.training_dict(), **cfg.lora_dict()})
    params.update(
        {
            "derived.world_size": pre.plan.world_size,
            "derived.effective_batch_size": pre.plan.effective_batch,
            "derived.total_steps": pre.plan.total_steps,
            "derived.warmup_steps": pre.plan.warmup_steps,
            "derived.zero_stage": pre.plan.zero_stage,
        }
    )
    if cfg.training.finetuning_type == "lora":
        params["derived.lora_scale"] = cfg.lora.lora_alpha / cfg.lora.r
    else:  # full fine-tuning: the LoRA section is not used, so it is not shown as if it were
        params = {k: v for k, v in params.items() if not k.startswith("lora.")}
    tracker.log_params(run_id, params)
    folder = Path(tempfile.mkdtemp(prefix="raytune_qvl-config-"))
    write_configs(cfg, pre.plan.deepspeed, folder)
    tracker.log_artifact(run_id, folder, "config")
    shutil.rmtree(folder, ignore_errors=True)
    log_audit(tracker, run_id, pre)
    n = cfg.evaluation.label_mask_samples
    if n:
        tokenizer, image_token = pre.processor.tokenizer, pre.processor.image_token_id
        html = label_mask_html(pre.train.items[:n], tokenizer, image_token, "Label mask: training samples")
        tracker.log_text(run_id, html, "data/label_mask.html")


def log_audit(tracker: Tracker, run_id: str, pre: Any) -> None:
    """The data audit of every split: metrics at step 0, data/audit.json and data/audit.txt."""
    splits = {"train": pre.train, "eval": pre.eval, "test": pre.test}
    audits = {name: split.audit for name, split in splits.items() if split is not None}
    for split, audit in audits.items():
        tracker.log_metrics(run_id, audit.metrics(f"data_{split}"), step=0)
    tracker.log_dict(run_id, {split: a.to_dict() for split, a in audits.items()}, "data/audit.json")
    tracker.log_text(run_id, "\n".join(a.format() for a in audits.values()) + "\n", "data/audit.txt")


def log_predictions(tracker: Tracker, run_id: str, predictions: Path) -> None:
    """The eval samples at the best checkpoint (image, reference, prediction, error) as an
    MLflow table and an HTML page, when generation eval wrote `predictions`."""
    if not predictions.is_file():
        return
    data = json.loads(predictions.read_text())
    rows = data["rows"]
    page = predictions_html(rows, data["task"], data.get("step"), "Predictions at the best checkpoint")
    tracker.log_text(run_id, page, "eval/predictions.html")
    tracker.log_table(run_id, [_table_row(r) for r in rows], "eval/predictions_table.json")


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    import mlflow
    from PIL import Image

    out = {k: row[k] for k in ("id", "reference", "prediction", "error")}
    if row.get("image") and Path(row["image"]).is_file():
        with Image.open(row["image"]) as img:
            out["image"] = mlflow.Image(img.convert("RGB"))
    return out


# ----------------------------------------------------------------------------- a sweep's parent run


def log_sweep_start(
    tracker: Tracker, space: Any, base: Any, pre: Any, prep_seconds: float, warm_start: dict[str, Any] | None = None
) -> str:
    """A sweep's parent run: how it searches, the search-space file, the data audit, and the warm
    start it was seeded from (WarmStart.summary(): params warm_start.*, warm_start.json). Returns its id."""
    tags = {TAG_KIND: "sweep", TAG_STRATEGY: space.strategy, TAG_SWEEP_DIR: str(Path(space.sweep_dir).absolute())}
    parent = tracker.start_run(space.name, tags)
    params = {
        "strategy": space.strategy,
        "metric": space.metric,
        "mode": space.mode,
        "parameters": ", ".join(space.parameters),
        "asha.time_attr": space.asha.time_attr,
        "asha.grace_period": space.asha.grace_period,
        "asha.reduction_factor": space.asha.reduction_factor,
        "workers_per_trial": space.resources.workers_per_trial,
        "model": base.model.name,
        "seed": space.seed,
    }
    if warm_start:
        params |= {f"warm_start.{k}": v for k, v in warm_start.items() if k != "start"}
    tracker.log_params(parent, params)
    if warm_start:
        tracker.log_dict(parent, warm_start, "warm_start.json")
    tracker.log_artifact(parent, space.source, "search_space")
    log_audit(tracker, parent, pre)
    tracker.log_metrics(parent, {"data_prep_seconds": prep_seconds}, step=0)
    return parent


def log_stage_best(
    tracker: Tracker, parent: str, label: str, index: int, metric: str, value: float, point: dict[str, Any], trial: str
) -> None:
    """A finished stage's best value (metric best_<metric> at step = stage index) and point."""
    tracker.log_metrics(parent, {f"best_{metric}": value}, step=index)
    tracker.log_params(parent, {f"{label}.best.{k}": v for k, v in point.items()} | {f"{label}.best_trial": trial})


def log_sweep_result(
    tracker: Tracker,
    parent: str,
    space: Any,
    state: Any,
    best: Any,
    best_dir: Path,
    predictions: Path,
    counts: dict[str, int],
    confirmations: Sequence[Any] = (),
    advice: Sequence[str] = (),
    front: dict[str, Any] | None = None,
) -> None:
    """The sweep's best (value, params, best/ folder, predictions), the trial counts, the
    confirmation (mean ± std, and the test score: the sweep's result), boundary advice, the cost
    front (CostFront.to_dict(): metrics and tag of the cheapest config within the tolerance,
    cost_front.json, a plot), the summary and the pictures. `state`: the SweepState; `best`: the
    winning TrialRecord."""
    from raytune_qvl.track.plots import log_sweep_plots

    metrics = {
        f"best_{space.metric}": best.value,
        "trials_completed": counts["completed"],
        "trials_stopped": counts["stopped"],
        "trials_failed": counts["failed"],
    }
    if confirmations:
        winner, held_out = confirmations[0], test_metric(space.metric)
        # a spread of one value is not a measurement: the std only where there are two or more
        metrics[f"best_{space.metric}_mean"] = winner.mean
        if len(winner.values) > 1:
            metrics[f"best_{space.metric}_std"] = winner.std
        if winner.test_mean is not None:
            metrics[f"{held_out}_mean"] = winner.test_mean
            if len(winner.tests) > 1:
                metrics[f"{held_out}_std"] = winner.test_std
        rows = [
            {
                "trial": c.trial_id,
                "values": c.values,
                "mean": c.mean,
                "std": c.std,
                "tests": c.tests,
                "failed": c.failed,
            }
            for c in confirmations
        ]
        tracker.log_dict(parent, rows, "confirmation.json")
    if advice:
        tracker.set_tags(parent, {TAG_BOUNDARY: " | ".join(advice)})
    if front is not None:
        configs = {c["trial"]: c for c in front["configs"]}
        best_cost, cheapest = configs[front["best"]], configs[front["cheapest_within"]]
        measure = front["measure"]
        metrics |= {
            f"best_cost_{measure}": best_cost["cost"][measure],
            f"cheapest_{space.metric}": cheapest["value"],
            f"cheapest_cost_{measure}": cheapest["cost"][measure],
            "cost_front_size": len(front["front"]),
        }
        tracker.set_tags(parent, {TAG_CHEAPEST: front["cheapest_within"]})
        tracker.log_dict(parent, front, "cost_front.json")
    if state.baseline is not None:  # the base model before any fine-tuning
        metrics[f"baseline_{space.metric}"] = state.baseline["value"]
    tracker.log_metrics(parent, metrics, step=len(state.stages) + 1)
    tracker.log_params(parent, {f"best.{k}": v for k, v in best.overrides.items()} | {"best.trial": best.trial_id})
    tracker.log_artifact(parent, best_dir, "best")
    log_predictions(tracker, parent, predictions)
    tracker.log_dict(parent, {"stages": state.stages, "trials": state.trials}, "sweep_summary.json")
    try:
        log_sweep_plots(tracker, parent, space, state.records(), front)
    except Exception as exc:  # noqa: BLE001 - a plot must not fail a finished sweep
        log.warning("sweep plots failed: %s", exc)
