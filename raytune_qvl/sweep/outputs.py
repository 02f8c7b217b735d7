"""What a finished sweep leaves on disk and prints: `best/` (ready-to-run configs, the command that
reproduces the best trial, its adapter), adapters kept for the best trials only (sweeps must not
fill the disk), and the table of the top trials."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from raytune_qvl.config.write import TRAINING_FILE, write_configs
from raytune_qvl.sweep.context import Sweep
from raytune_qvl.sweep.points import apply_to_config
from raytune_qvl.sweep.records import TrialRecord, rank
from raytune_qvl.sweep.space import EPOCHS_KEY, LR_KEY, RANK_KEY
from raytune_qvl.sweep.trial import train_storage, trial_dir
from raytune_qvl.train.outputs import BEST_DIR, FINAL_DIR

__all__ = [
    "ranked",
    "write_best",
    "prune_checkpoints",
    "top_table",
    "confirmation_table",
    "cost_table",
    "sweep_front",
    "mean_std",
    "boundary_advice",
    "reading_sample",
    "trial_folder",
]

log = logging.getLogger("raytune_qvl")

_TABLE_KEYS = {
    LR_KEY: "lr",
    RANK_KEY: "r",
    "lora.lora_alpha": "alpha",
    "training.gradient_accumulation_steps": "accum",
    EPOCHS_KEY: "epochs",
}


def trial_folder(sweep: Sweep, record: TrialRecord) -> Path:
    """Where a trial's outputs are: this sweep's trials/, or its source's for an imported record."""
    return Path(trial_dir(record.origin or str(sweep.dir), record.trial_id))


def ranked(sweep: Sweep) -> list[TrialRecord]:
    """Every trained trial of the sweep with a value, best first."""
    return rank(sweep.state.trained(), sweep.space.mode)


def prune_checkpoints(sweep: Sweep, keep: list[str] = ()) -> None:
    """Sweeps must not fill the disk: engine checkpoints of finished trials go (they only
    serve restarts), and adapters stay for the best `keep_best_adapters` trials only (and the
    trials in `keep`: the confirmed configs, one of which best/ copies; until then the configs to
    confirm, any of which may win by its mean). A warm start's source is never touched."""
    confirm = sweep.space.confirm
    to_confirm = confirm.top_k if confirm.seeds else 0
    best = ranked(sweep)[: max(1, sweep.space.keep_best_adapters, to_confirm)]
    keep = {r.trial_id for r in best} | set(keep)
    storage = train_storage(sweep.space)
    for rec in sweep.state.trained():
        if rec.origin:
            continue
        if "://" not in storage:
            runs = [Path(storage) / rec.trial_id, *Path(storage).glob(f"{rec.trial_id}-micro*")]  # OOM retries
            for ckpt in (c for run in runs for c in run.glob("checkpoint-*")):
                shutil.rmtree(ckpt, ignore_errors=True)
        if rec.trial_id not in keep:
            for name in (FINAL_DIR, BEST_DIR):
                shutil.rmtree(Path(trial_dir(str(sweep.dir), rec.trial_id)) / name, ignore_errors=True)


def write_best(sweep: Sweep, best: TrialRecord) -> Path:
    """Ready-to-run configs of the best trial, the command that reproduces it, its adapter."""
    space, base = sweep.space, sweep.base
    best_dir = sweep.dir / "best"
    tmp = best_dir.with_name("best.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = apply_to_config(base, {**best.overrides, **best.fit}, space.source)  # fit: the micro batch it ran at
    run_settings = {
        "output.dir": str((best_dir / "run").absolute()),
        "ray.num_workers": space.resources.workers_per_trial,
        "ray.use_gpu": space.resources.use_gpu,
        "training.metric_for_best_model": space.metric,
        "training.greater_is_better": space.mode == "max",
        "output.tracking_uri": sweep.state.tracking_uri,
        "output.experiment_name": space.experiment,
        "environment.deepspeed": str((best_dir / "ds_config.json").absolute()),
    }
    cfg = apply_to_config(cfg, run_settings, space.source)
    header = f"Best trial {best.trial_id} of sweep {space.name} ({space.metric} {best.value:.6g})."
    write_configs(cfg, base.deepspeed, tmp, header=header)
    folder = best_dir.absolute()
    command = (
        f"python -m raytune_qvl.train --config {folder / TRAINING_FILE} "
        f"--lora_config {folder / 'lora_config.yaml'} --deepspeed {folder / 'ds_config.json'}"
    )
    (tmp / "command.txt").write_text(command + "\n")
    summary = {
        "trial": best.trial_id,
        "stage": best.stage,
        "metric": space.metric,
        "value": best.value,
        "overrides": best.overrides,
    }
    if best.fit:
        summary["memory_fit"] = best.fit  # it ran out of memory at the base's micro batch
    if best.origin:
        summary["from_warm_start"] = best.origin  # trained by the sweep this one was seeded from
    (tmp / "best.json").write_text(json.dumps(summary, indent=2))
    trial = trial_folder(sweep, best)
    # the trained adapter; for a trial ASHA stopped, the one at its best evaluation
    adapter = next((d for d in (trial / FINAL_DIR, trial / BEST_DIR) if (d / "adapter_config.json").is_file()), None)
    if adapter is not None:
        shutil.copytree(adapter, tmp / "adapter")
    else:
        log.warning(
            "trial %s left no adapter (its output folder is on another node?); best/ holds its configs only",
            best.trial_id,
        )
    shutil.rmtree(best_dir, ignore_errors=True)
    tmp.rename(best_dir)
    return best_dir


def top_table(sweep: Sweep, records: list[TrialRecord], counts: dict[str, int]) -> str:
    """The best ten trials with their status, value and parameters."""
    metric = sweep.space.metric
    keys = [k for k in _TABLE_KEYS if any(k in r.overrides for r in records)]
    header = f"{'#':>2}  {'trial':<22} {'stage':<28} {'status':<9} {metric:>10}  " + "  ".join(
        f"{_TABLE_KEYS[k]:>8}" for k in keys
    )
    title = (
        f"top trials ({counts['completed']} completed, {counts['stopped']} stopped by ASHA, {counts['failed']} failed"
    )
    warm = sum(1 for r in records if r.origin)
    title += f"; {warm} full runs of the warm start's source, status warm):" if warm else "):"
    lines = ["", title, header]
    for i, r in enumerate(records[:10], start=1):
        values = "  ".join(_cell(r.overrides.get(k, "")) for k in keys)
        status = "warm" if r.origin else r.status
        lines.append(f"{i:>2}  {r.trial_id:<22} {r.stage:<28} {status:<9} {r.value:>10.4f}  {values}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:>8.3g}" if isinstance(value, float) else f"{value:>8}"


def reading_sample(predictions: Path, rows: int = 5) -> str:
    """The first `rows` eval samples as the best adapter read them: reference | prediction."""
    if not predictions.is_file():
        return "  (no predictions: the best trial ran no generation eval)"
    data = json.loads(predictions.read_text())
    shown = data["rows"][:rows]
    width = max(len(r["reference"]) for r in shown) if shown else 0
    lines = [f"  how the best adapter reads (step {data.get('step')}, reference | prediction):"]
    lines += [f"    {r['reference']:<{width}} | {r['prediction']}" for r in shown]
    return "\n".join(lines)


def mean_std(mean: float, std: float, n: int) -> str:
    """A mean with its spread; one run has no spread to show."""
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def count(n: int, noun: str) -> str:
    """'1 run', '2 runs'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def confirmation_table(space: Any, confirmations: list[Any]) -> str:
    """Each confirmed config: its mean and spread over the search run and the confirmation runs,
    and its test score; the winner (the best mean) first."""
    from raytune_qvl.config.schema import test_metric

    metric, test = space.metric, test_metric(space.metric)
    keys = [k for k in _TABLE_KEYS if any(k in c.overrides for c in confirmations)]
    shown = "  ".join(f"{_TABLE_KEYS[k]:>8}" for k in keys)
    more = len(confirmations[0].values) - 1
    lines = [
        "",
        f"confirmed (the search's run and {more} more seed{'' if more == 1 else 's'} each; the winner by the mean):",
        f"{'#':>2}  {'trial':<22} {metric + ' mean ± std':>22} {'n':>3}  {test + ' mean ± std':>22} {'n':>3}  {shown}",
    ]
    for i, c in enumerate(confirmations, start=1):
        held_out = mean_std(c.test_mean, c.test_std, len(c.tests)) if c.test_mean is not None else "—"
        values = "  ".join(_cell(c.overrides.get(k, "")) for k in keys)
        row = f"{i:>2}  {c.trial_id:<22} {mean_std(c.mean, c.std, len(c.values)):>22} {len(c.values):>3}"
        failed = f"  ({count(c.failed, 'confirmation run')} failed: ranked last)" if c.failed else ""
        lines.append(f"{row}  {held_out:>22} {len(c.tests):>3}  {values}{failed}")
    return "\n".join(lines)


def sweep_front(sweep: Sweep, records: list[TrialRecord], confirmations: list[Any], best: TrialRecord) -> Any:
    """The sweep's CostFront (sweep/cost.py) over its full-budget trials, or None when no trial
    has the chosen measure."""
    from raytune_qvl.sweep.cost import cost_front, resolve_measure

    space = sweep.space
    return cost_front(
        records,
        confirmations,
        sweep.state.records(),
        metric=space.metric,
        mode=space.mode,
        measure=resolve_measure(space.cost.measure, space.resources.use_gpu),
        within=space.cost.within,
        best_trial=best.trial_id,
    )


def cost_table(front: Any) -> str:
    """The front of the metric against cost (sweep/cost.py), cheapest first: every config on it,
    with the best and the cheapest within the tolerance marked, then the line that names the latter."""
    from raytune_qvl.sweep.cost import COST_UNITS, COSTS

    measure, metric = front.measure, front.metric
    shown = [c for c in COSTS if any(c in e.cost for e in front.front)]
    names = {"worker_seconds": "worker-s", "gpu_seconds": "GPU-s", "trainable_params": "trainable"}
    heads = "  ".join(f"{names.get(c, c.replace('_', ' ')):>12}" for c in shown)
    lines = [
        "",
        f"cost front ({metric} against {COST_UNITS[measure]}; {len(front.front)} of {len(front.entries)} configs "
        "are on it: none cheaper is as good):",
        f"{'#':>2}  {'trial':<22} {metric:>10} {'runs':>4}  {heads}",
    ]
    rows = front.front + ([] if front.best in front.front else [front.best])  # the winner, on it or not
    rows.sort(key=lambda e: e.cost[measure])
    for i, e in enumerate(rows, start=1):
        marks = [
            m for m, t in (("best", front.best), (f"cheapest within {front.within:.0%}", front.cheapest)) if e is t
        ]
        if e not in front.front:
            marks.append("off the front")
        cells = "  ".join(_cost_cell(e.cost.get(c)) for c in shown)
        lines.append(f"{i:>2}  {e.trial_id:<22} {e.value:>10.4f} {e.runs:>4}  {cells}  {', '.join(marks)}".rstrip())
    best, cheap = front.best, front.cheapest
    if cheap is best:
        lines.append(f"  no config within {front.within:.0%} of the best costs less than the best ({best.trial_id})")
    else:
        share = cheap.cost[measure] / best.cost[measure] if best.cost.get(measure) else float("nan")
        lines.append(
            f"  cheapest within {front.within:.0%} of the best: {cheap.trial_id} ({metric} {cheap.value:.4f} against "
            f"{best.value:.4f}) at {share:.0%} of the best's {COST_UNITS[measure]}"
        )
    return "\n".join(lines)


def _cost_cell(value: float | None) -> str:
    if value is None:
        return f"{'—':>12}"
    return f"{value:>12,.0f}" if value >= 100 else f"{value:>12.3g}"


def boundary_advice(space: Any, best: TrialRecord, lr_batch: int | None = None) -> list[str]:
    """A winner at the edge of a searched range may be better still outside it: one line per such
    parameter, with the range to try next. The learning-rate range is at the batch its stage ran at
    (`lr_batch`): a winner that trained at another effective batch has its rate moved back there by
    the scaling rule before it is compared."""
    from raytune_qvl.config.batch_math import scale_lr
    from raytune_qvl.sweep.space import EFFECTIVE_BATCH, LR_FACTOR, LR_KEY

    rule = space.lr_scaling.rule if space.strategy == "staged" else "none"
    lines = []
    for key, domain in space.parameters.items():
        value = best.point.get(key)
        if value is None or key == LR_FACTOR or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        ends = [v for v in domain.extremes() if isinstance(v, int | float)]
        if len(ends) < 2:
            continue
        low, high = min(ends), max(ends)
        shown = f"{key} {value:g}"
        trained_batch = best.point.get(EFFECTIVE_BATCH)
        if key == LR_KEY and lr_batch and trained_batch and int(trained_batch) != lr_batch and rule != "none":
            value = scale_lr(float(value), lr_batch, int(trained_batch), rule)
            shown = (
                f"{key} {best.point[key]:g} at effective batch {trained_batch} ({value:g} at the stage's {lr_batch})"
            )
        if value >= high:
            further = high * 2 if isinstance(high, float) or key != "training.num_epochs" else high + 2
            lines.append(f"{shown} is the top of its range [{low:g}, {high:g}]: try up to {further:g}")
        elif value <= low:
            further = low / 2 if isinstance(low, float) else max(1, low // 2)
            lines.append(f"{shown} is the bottom of its range [{low:g}, {high:g}]: try down to {further:g}")
    return lines
