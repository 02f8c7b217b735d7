"""The sweep's own logic without a cluster: UniqueSearch around a real OptunaSearch (in-memory
study), ranking and its tie-breaks, the state file round trip, concurrency from resources and the
search-space override grammar."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import ROOT
from raytune_qvl.errors import ConfigError
from raytune_qvl.sweep.load import load_search_space, parse_space_override
from raytune_qvl.sweep.plan import concurrency_for
from raytune_qvl.sweep.points import PointResolver
from raytune_qvl.sweep.records import TrialRecord, best_record, last_value, point_key, rank
from raytune_qvl.sweep.space import Domain, Stage
from raytune_qvl.sweep.state import SweepState

RANKS = {"lora.r": Domain(choices=[4, 8])}


@pytest.fixture(scope="module")
def tiny_space():
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # the shipped file's base configs are relative to the repository root
    try:
        return load_search_space(ROOT / "search_spaces" / "tiny_cpu.yaml", check_files=False)
    finally:
        os.chdir(cwd)


def _resolver(tiny_space) -> PointResolver:
    space, base = tiny_space
    return PointResolver(space.model_dump(mode="json"), base.model_dump(mode="json"), {}, 16)


def _search(tiny_space, known: dict, points_to_evaluate: list | None = None):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from raytune_qvl.sweep.search import UniqueSearch, optuna_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    inner = OptunaSearch(
        space=optuna_space(RANKS, {"lora.r": int}),
        metric="eval_cer",
        mode="min",
        sampler=optuna.samplers.TPESampler(seed=0),
        points_to_evaluate=points_to_evaluate,
    )
    return UniqueSearch(inner, _resolver(tiny_space), RANKS, known, seed=0, sampler="tpe", startup=1)


def _key(tiny_space, r: int) -> tuple:
    return point_key(_resolver(tiny_space).overrides({"lora.r": r}))


def test_a_repeat_suggestion_is_told_the_known_result_and_not_trained(tiny_space) -> None:
    # Optuna's first suggestion is the point trained in an earlier stage (r=4, CER 0.5)
    search = _search(tiny_space, {_key(tiny_space, 4): 0.5}, points_to_evaluate=[{"lora.r": 4}])
    suggested = search.suggest("trial-1")
    assert suggested["lora.r"] == 8  # the other point, not the repeat
    assert suggested["sampler"] == "tpe"  # the searcher's own words; one told result: TPE models from here
    study = search.inner._ot_study
    told = [t for t in study.trials if t.params == {"lora.r": 4}]
    assert len(told) == 1 and told[0].value == pytest.approx(0.5) and told[0].state.name == "COMPLETE"


def test_a_repeat_is_told_once(tiny_space) -> None:
    """Optuna keeps suggesting the known point; its result is counted once, not at every repeat."""
    search = _search(tiny_space, {_key(tiny_space, 4): 0.5}, points_to_evaluate=[{"lora.r": 4}, {"lora.r": 4}])
    assert search.suggest("trial-1")["lora.r"] == 8
    complete = [t for t in search.inner._ot_study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 1  # the second repeat was dropped (FAIL), not told again


def test_an_exhausted_finite_space_ends_the_stage(tiny_space) -> None:
    from ray.tune.search import Searcher

    search = _search(tiny_space, {_key(tiny_space, 4): 0.5, _key(tiny_space, 8): 0.7})
    assert search.suggest("trial-1") == Searcher.FINISHED


def test_a_finished_trial_becomes_known_and_a_failed_one_is_told_as_failed(tiny_space) -> None:
    from ray.tune.search import Searcher

    search = _search(tiny_space, {})
    first = search.suggest("trial-1")
    second = search.suggest("trial-2")
    assert {first["lora.r"], second["lora.r"]} == {4, 8}  # two trials, two distinct points
    search.on_trial_complete("trial-1", {"eval_cer": 0.25})
    search.on_trial_complete("trial-2", None, error=True)
    assert search.known[_key(tiny_space, first["lora.r"])] == 0.25
    states = sorted(t.state.name for t in search.inner._ot_study.trials)
    assert states == ["COMPLETE", "FAIL"]
    assert search.suggest("trial-3") == Searcher.FINISHED  # both points tried


def _record(trial: str, value: float | None, status: str = "completed") -> TrialRecord:
    return TrialRecord(trial, "stage1-training_learning_rate", {"training.learning_rate": 1e-3}, {}, value, status)


def test_only_full_budgets_are_ranked_and_a_stopped_trial_never_wins() -> None:
    records = [
        _record("stopped", 0.1, "stopped"),  # the lowest value, at a partial budget
        _record("worse", 0.3),
        _record("failed", 0.01, "failed"),
        _record("nan", math.nan),
        _record("none", None),
        _record("completed", 0.2),
        _record("earlier", 0.25, "reused"),  # a full run of an earlier stage, counted again
    ]
    assert [r.trial_id for r in rank(records, "min")] == ["completed", "earlier", "worse"]
    assert [r.trial_id for r in rank(records, "max")] == ["worse", "earlier", "completed"]
    assert best_record(records, "min").trial_id == "completed"
    assert best_record([_record("failed", 0.1, "failed"), _record("stopped", 0.1, "stopped")], "min") is None


def test_the_sampler_is_named_for_what_really_runs(tiny_space) -> None:
    from raytune_qvl.sweep.search import max_budget, make_scheduler, sampler_for
    from raytune_qvl.sweep.space import stages

    space, base = tiny_space
    resolver = _resolver(tiny_space)
    lr, rank_stage, batch, epochs = stages(space)
    assert sampler_for(space, lr, resolver, {}) == ("grid", 0)  # 4 choices, 4 trials: every choice
    assert sampler_for(space, rank_stage, resolver, {}) == ("tpe", 1)  # 4 choices, 3 trials: TPE, 1 at random
    assert sampler_for(space, rank_stage, resolver, {_key(tiny_space, 8): 0.3}) == ("grid", 0)  # 3 untried left
    assert sampler_for(space, batch, resolver, {}) == ("tpe", 1)  # a continuous lr factor: no grid
    random_space = space.model_copy(update={"strategy": "random"})
    assert sampler_for(random_space, lr, resolver, {}) == ("random", 0)
    # the epochs stage compares whole schedules: no early stopping there
    assert type(make_scheduler(space, epochs, 8.0)).__name__ == "FIFOScheduler"
    assert type(make_scheduler(space, lr, 6.0)).__name__ == "AsyncHyperBandScheduler"
    fixed = {"training.num_epochs": 6}
    assert max_budget(space, base, lr, fixed, 256) == 6.0
    # asha.max_t is honoured (the rungs go up to it), and refused below the longest trial, which
    # ASHA would stop there (the shipped space starts at 4 epochs; its epochs stage has no ASHA)
    from raytune_qvl.sweep.search import max_t_problem

    def capped(max_t: float):
        return space.model_copy(update={"asha": space.asha.model_copy(update={"max_t": max_t})})

    assert max_budget(capped(8.0), base, lr, fixed, 256) == 8.0 and max_t_problem(capped(8.0), base, 256) is None
    assert max_t_problem(capped(4.0), base, 256) is None
    assert max_t_problem(capped(3.0), base, 256).startswith("is below the longest trial (4 epochs)")
    assert max_budget(capped(3.0), base, lr, fixed, 256) == 6.0  # never cuts a trial short
    # a random search over the epochs has no early stopping either
    assert type(make_scheduler(random_space, stages(random_space)[0], 6.0)).__name__ == "FIFOScheduler"
    samples = space.model_copy(update={"asha": space.asha.model_copy(update={"time_attr": "samples_seen"})})
    # an epoch trains whole effective batches: 250 samples at batch 16 train 240 of them
    assert max_budget(samples, base, lr, {**fixed, "effective_batch": 16}, 250) == 6 * 240


def test_a_trials_value_is_its_last_reported_number() -> None:
    history = [{"eval_cer": 0.5}, {"loss": 1.0}, {"eval_cer": 0.3}, {"eval_cer": math.nan}]
    assert last_value(history, "eval_cer") == 0.3
    assert last_value([{"loss": 1.0}], "eval_cer") is None


def test_point_keys_ignore_float_noise_and_order() -> None:
    a = point_key({"lora.r": 8, "training.learning_rate": 3e-4 * (1 + 1e-13)})
    assert a == point_key({"training.learning_rate": 3e-4, "lora.r": 8})
    assert a != point_key({"training.learning_rate": 3.1e-4, "lora.r": 8})


def test_the_state_file_round_trips(tmp_path: Path) -> None:
    state = SweepState(name="s", tracking_uri="sqlite:////x.db", parent_run_id="p1")
    state.stages["stage1-training_learning_rate"] = {"status": "done", "best": {"training.learning_rate": 1e-3}}
    state.set_stage_records("stage1-training_learning_rate", [_record("a", 0.2), _record("b", None, "failed")])
    reused = TrialRecord("a", "stage2-lora_r", {"lora.r": 8}, {}, 0.2, "reused")
    state.set_stage_records("stage2-lora_r", [reused])
    path = tmp_path / "sweep_state.json"
    state.save(path)
    again = SweepState.load(path)
    assert again == state
    assert [r.trial_id for r in again.trained()] == ["a", "b"]  # the reused record is no trial of its own
    assert again.counts() == {"completed": 1, "stopped": 0, "failed": 1}
    # a stage's records are replaced, not appended, when the stage is recorded again
    again.set_stage_records("stage1-training_learning_rate", [_record("c", 0.1)])
    assert sorted(r.trial_id for r in again.records()) == ["a", "c"]


def test_concurrency_follows_the_resources(tiny_space) -> None:
    space, _ = tiny_space

    def with_resources(**changes):
        return space.model_copy(update={"resources": space.resources.model_copy(update=changes)})

    assert concurrency_for(with_resources(workers_per_trial=1, cpus_per_worker=1), cpus=2, gpus=0) == 2
    assert concurrency_for(with_resources(workers_per_trial=2, cpus_per_worker=1), cpus=2, gpus=0) == 1
    assert concurrency_for(with_resources(workers_per_trial=2, cpus_per_worker=4), cpus=2, gpus=0) == 1  # at least one
    # on a joined cluster each trial's own process takes a CPU too
    assert concurrency_for(with_resources(workers_per_trial=1, cpus_per_worker=1), cpus=8, gpus=0, trial_cpu=1) == 4
    assert concurrency_for(with_resources(workers_per_trial=1, max_concurrent_trials=3), cpus=16, gpus=0) == 3
    gpu = with_resources(use_gpu=True, workers_per_trial=4, cpus_per_worker=8, gpus_per_worker=1)
    assert concurrency_for(gpu, cpus=128, gpus=8) == 2  # GPUs bound it, not CPUs
    with pytest.raises(ConfigError, match="a trial needs 4 GPUs; the cluster has 2"):
        concurrency_for(gpu, cpus=128, gpus=2)


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("resources.max_concurrent_trials=2", (["resources", "max_concurrent_trials"], 2)),
        ("strategy=joint", (["strategy"], "joint")),
        ("overrides.data.train_path=/shared/train.jsonl", (["overrides", "data.train_path"], "/shared/train.jsonl")),
        ("parameters.training.learning_rate.high=1e-3", (["parameters", "training.learning_rate", "high"], 1e-3)),
        ("parameters.lora.r={choices: [4, 8]}", (["parameters", "lora.r"], {"choices": [4, 8]})),
        ("trials_per_stage.lora.r=4", (["trials_per_stage", "lora.r"], 4)),
        ("mlflow.tracking_uri=", (["mlflow", "tracking_uri"], None)),
    ],
)
def test_the_search_space_override_grammar(text: str, parsed: tuple) -> None:
    assert parse_space_override(text) == parsed


@pytest.mark.parametrize("text", ["strategy", "=joint", "resources..x=1"])
def test_a_malformed_override_is_one_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="an override is key=value"):
        parse_space_override(text)


def test_a_stage_label_names_its_parameter() -> None:
    assert Stage(3, "effective_batch", {}, 2).label == "stage3-effective_batch"
    assert Stage(1, "training.learning_rate", {}, 4).label == "stage1-training_learning_rate"


@pytest.mark.parametrize("every, save_steps", [(1, 6), (3, 18), (0, None)])
def test_a_trials_engine_checkpoints_follow_checkpoint_every(tiny_space, every: int, save_steps: int | None) -> None:
    from raytune_qvl.config.plan import make_plan
    from raytune_qvl.sweep.points import trial_config

    space, base = tiny_space
    space = space.model_copy(update={"checkpoint_every": every})
    cfg = trial_config(space, base, {}, 16, "/tmp/trial", eval_steps=6)
    assert cfg.training.eval_steps == 6
    assert cfg.training.final_checkpoint == "adapter"  # a finished trial is never resumed
    text = make_plan(cfg, 256).checkpoint_text()
    if save_steps is not None:
        assert cfg.training.save_steps == save_steps
        assert "the last step's the adapter only" in text and "engine state" in text
    else:  # none before the last step, whose is the adapter alone: no engine state at all
        assert cfg.training.save_steps > 10**6
        assert "at the last step only, the adapter alone" in text and "engine state" not in text


def _costed(trial: str, value: float, seconds: float, samples: int = 64) -> TrialRecord:
    record = _record(trial, value)
    record.overrides = {"lora.r": int(seconds)}
    record.cost = {"worker_seconds": seconds, "samples": float(samples), "trainable_params": 1e5}
    return record


def test_the_cost_front_names_the_best_and_the_cheapest_config_within_the_tolerance(tmp_path: Path) -> None:
    from raytune_qvl.sweep.confirm import Confirmed
    from raytune_qvl.sweep.cost import cost_front, trial_cost
    from raytune_qvl.sweep.outputs import cost_table
    from raytune_qvl.sweep.space import Resources
    from raytune_qvl.track.plots import cost_front_figure

    records = [
        _costed("slow-best", 0.200, 400.0),
        _costed("mid", 0.201, 200.0),  # within 1% of the best at half its cost
        _costed("cheap", 0.260, 50.0),  # cheapest of all, far from the best
        _costed("dominated", 0.300, 300.0),  # dearer than mid and worse: off the front
    ]
    kw = dict(metric="eval_cer", mode="min", measure="worker_seconds", best_trial="slow-best")
    front = cost_front(records, [], [], within=0.01, **kw)
    assert [e.trial_id for e in front.front] == ["cheap", "mid", "slow-best"]
    assert front.best.trial_id == "slow-best" and front.cheapest.trial_id == "mid"
    assert cost_front(records, [], [], within=0.0, **kw).cheapest.trial_id == "slow-best"
    assert cost_front(records, [], [], within=0.5, **kw).cheapest.trial_id == "cheap"
    # a confirmed config counts with its mean value and the mean cost of its runs
    again = TrialRecord("again", "confirm", {"of": "mid", "seed": 1}, {}, 0.207, "confirmation")
    again.cost = {"worker_seconds": 260.0}
    confirmed = cost_front(records, [Confirmed("mid", {}, [0.201, 0.207])], [again], within=0.01, **kw)
    mid = next(e for e in confirmed.entries if e.trial_id == "mid")
    assert mid.value == pytest.approx(0.204) and mid.runs == 2 and mid.cost["worker_seconds"] == pytest.approx(230.0)
    assert confirmed.cheapest.trial_id == "slow-best"  # 0.204 is more than 1% above 0.200
    # higher-is-better metrics: the tolerance is below the best
    up = [_costed("a", 0.90, 100.0), _costed("b", 0.895, 10.0), _costed("c", 0.80, 1.0)]
    maxed = cost_front(up, [], [], metric="eval_exact_match", mode="max", measure="worker_seconds", within=0.01,
                       best_trial="a")  # fmt: skip
    assert maxed.cheapest.trial_id == "b" and [e.trial_id for e in maxed.front] == ["c", "b", "a"]

    table = cost_table(front)
    assert "cheapest within 1% of the best: mid" in table
    rows = {line.split()[1]: line for line in table.splitlines() if line[:2].strip().isdigit()}
    assert list(rows) == ["cheap", "mid", "slow-best"]
    assert rows["mid"].endswith("cheapest within 1%") and rows["slow-best"].endswith("best")
    assert "dominated" not in table
    fig = cost_front_figure(front.to_dict())
    fig.savefig(tmp_path / "front.png")
    assert (tmp_path / "front.png").stat().st_size > 10_000

    # what a trial's last report costs: wall time x workers (x GPUs), samples, parameters, memory
    last = {"time_total_s": 30.0, "samples_seen": 96, "trainable_params": 1234, "peak_host_rss_gb_max": 2.5,
            "peak_gpu_memory_gb_max": 20.0}  # fmt: skip
    cpu = trial_cost(last, Resources(workers_per_trial=2))
    assert cpu == {"worker_seconds": 60.0, "samples": 96.0, "trainable_params": 1234.0, "peak_memory_gb": 2.5}
    gpu = trial_cost(last, Resources(workers_per_trial=2, use_gpu=True, gpus_per_worker=1))
    assert gpu["gpu_seconds"] == 60.0 and gpu["peak_memory_gb"] == 20.0


def test_a_warm_start_tells_the_sources_points_and_starts_from_its_best(tiny_space, tmp_path: Path) -> None:
    import json

    from raytune_qvl.sweep.search import make_searcher
    from raytune_qvl.sweep.space import stages
    from raytune_qvl.sweep.stage import in_slice
    from raytune_qvl.sweep.warm import load_warm_start, sweep_digest

    space, base = tiny_space
    digest = sweep_digest(space, base, ["train-rows", "eval-rows"])
    lr = "training.learning_rate"
    full = {"lora.r": 16, "lora.lora_alpha": 32, "training.gradient_accumulation_steps": 2, "training.num_epochs": 4}
    source = tmp_path / "earlier"
    (source / "best").mkdir(parents=True)
    trials = [
        TrialRecord("best", "s1", {lr: 3e-4}, {lr: 3e-4, **full}, 0.2, "completed"),
        TrialRecord("same-r", "s1", {lr: 1e-3}, {lr: 1e-3, **full}, 0.3, "stopped"),
        TrialRecord("lr-only", "s1", {lr: 1e-4}, {lr: 1e-4}, 0.4, "completed"),  # the rest at the base's values
        TrialRecord("dora", "s2", {}, {lr: 1e-3, "lora.use_dora": True}, 0.1, "completed"),  # not in this space
        TrialRecord("broken", "s1", {lr: 3e-3}, {lr: 3e-3, **full}, None, "failed"),
    ]
    state = SweepState(name="earlier", digest=digest)
    state.add_records(trials)
    state.save(source / "sweep_state.json")
    (source / "best" / "best.json").write_text(json.dumps({"trial": "best"}))

    warm = load_warm_start(str(source), space, base, digest)
    assert [r.trial_id for r in warm.records] == ["best", "same-r", "lr-only"] and warm.outside == 1
    assert all(r.origin == str(source.absolute()) for r in warm.records)
    lr_only = warm.records[2]
    assert lr_only.overrides["lora.r"] == 8 and lr_only.point["effective_batch"] == 16  # the base's, made explicit
    assert warm.best.trial_id == "best"
    assert warm.start == {lr: 3e-4, "lora.r": 16, "effective_batch": 16, "training.num_epochs": 4}

    # stage 1 searches the rate with the rest held at the source's best: the best and the stopped
    # trial at the same rank lie in its slice and are told before any suggestion; lr-only (rank 8) not
    stage = stages(space)[0]
    held = {k: v for k, v in warm.start.items() if k not in stage.params}
    resolver = PointResolver(space.model_dump(mode="json"), base.model_dump(mode="json"), held, 16)
    members = in_slice(stage, resolver, warm.records)
    assert sorted(rec.trial_id for _, rec in members) == ["best", "same-r"]
    known = {point_key(r.overrides): r.value for r in warm.records}
    searcher = make_searcher(space, stage, resolver, known, tmp_path / "optuna.db", [(s, r.value) for s, r in members])
    told = sorted((t.params[lr], t.value) for t in searcher.inner._ot_study.trials if t.state.name == "COMPLETE")
    assert told == [(3e-4, 0.2), (1e-3, 0.3)]
    suggested = {searcher.suggest(f"t{i}")[lr] for i in range(2)}
    assert suggested == {1e-4, 3e-3}  # the untried rates at this rank; nothing the source trained

    with pytest.raises(ConfigError, match="another task"):
        load_warm_start(str(source), space, base, sweep_digest(space, base, ["other-rows", "eval-rows"]))
    with pytest.raises(ConfigError, match="no sweep_state.json"):
        load_warm_start(str(tmp_path), space, base, digest)


def test_running_out_of_memory_halves_the_micro_batch_instead_of_retrying_the_same_point(monkeypatch) -> None:
    import torch

    from raytune_qvl.sweep.records import memory_fit
    from raytune_qvl.sweep.trial import is_node_memory, is_out_of_memory, is_transient, smaller_micro
    from raytune_qvl.train.faults import FAULT_OOM_ENV, Faults

    assert [smaller_micro(m) for m in (8, 6, 4, 3, 2, 1)] == [4, 3, 2, 1, 1, None]
    oom = RuntimeError("worker 0: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(oom, str(oom)) and not is_transient(oom, str(oom))
    died = RuntimeError("worker 1: ray.exceptions.ActorDiedError: The actor died unexpectedly")
    assert is_transient(died, str(died)) and not is_out_of_memory(died, str(died))
    assert not is_out_of_memory(ValueError("bad"), "bad") and not is_transient(ValueError("bad"), "bad")
    node = RuntimeError("ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.")
    assert is_node_memory(node, str(node)) and is_out_of_memory(node, str(node)) and not is_node_memory(oom, str(oom))
    ran = {"micro_batch": 2, "accumulation_steps": 8}
    assert memory_fit(ran, 4) == {"training.per_device_train_batch_size": 2, "training.gradient_accumulation_steps": 8}
    assert memory_fit(ran, 2) == {} and memory_fit({}, 4) == {}

    # the fault hook: the spec naming a value of the run's config first, else the plain one
    from raytune_qvl.config.load import load_config

    tiny = ROOT / "configs/tiny"
    cfg = load_config(str(tiny / "training_config.yaml"), str(tiny / "lora_config.yaml"), check_files=False)
    monkeypatch.setenv(FAULT_OOM_ENV, f"lora.r={cfg.lora.r}@0;2")
    with pytest.raises(torch.OutOfMemoryError, match="micro batch 4 is above 0"):
        Faults(cfg, 0, 1).before_step()
    monkeypatch.setenv(FAULT_OOM_ENV, "lora.r=999@0;4")
    Faults(cfg, 0, 1).before_step()  # micro 4 fits under 4
    monkeypatch.setenv(FAULT_OOM_ENV, "lora.r=999@0;3")
    with pytest.raises(torch.OutOfMemoryError):
        Faults(cfg, 0, 1).before_step()


def _sweep(space, records: list[TrialRecord], **changes):
    """A Sweep over `records` (the space's other settings changed by `changes`), without a cluster."""
    from dataclasses import asdict

    from raytune_qvl.sweep.context import Sweep

    state = SweepState(name=space.name, trials=[asdict(r) for r in records])
    return Sweep(space.model_copy(update=changes), None, None, state, None, "parent")


def _confirmation(of: str, value: float | None, status: str = "confirmation") -> TrialRecord:
    return TrialRecord(f"c-{of}-{value}", "confirm", {"of": of}, {}, value, status)


def test_a_config_whose_confirmation_failed_never_wins_on_its_lucky_seed(tiny_space) -> None:
    """'lucky' has the best search value, but one of its other seeds diverges: it ranks after
    'steady', whose seeds all trained, and the table says why."""
    from raytune_qvl.sweep.confirm import confirmed
    from raytune_qvl.sweep.outputs import confirmation_table

    space, _ = tiny_space
    records = [
        _record("lucky", 0.10),
        _record("steady", 0.12),
        _confirmation("lucky", None, "failed"),
        _confirmation("lucky", 0.11),
        _confirmation("steady", 0.13),
        _confirmation("steady", 0.125),
    ]
    table = confirmed(_sweep(space, records))
    assert [(c.trial_id, c.failed) for c in table] == [("steady", 0), ("lucky", 1)]
    assert table[0].values == [0.12, 0.13, 0.125] and table[1].values == [0.10, 0.11]
    assert "1 confirmation run failed: ranked last" in confirmation_table(space, table).splitlines()[-1]
    # without the failure the lucky config wins by its mean
    assert confirmed(_sweep(space, [r for r in records if r.status != "failed"]))[0].trial_id == "lucky"


def test_the_configs_to_confirm_keep_their_adapters_until_confirmed(tiny_space, tmp_path: Path) -> None:
    """keep_best_adapters 1 and three configs to confirm: the adapters of all three stay (any may win
    by its mean); without confirmation only the best's."""
    from raytune_qvl.sweep.outputs import prune_checkpoints
    from raytune_qvl.sweep.space import Confirm
    from raytune_qvl.sweep.trial import trial_dir

    space, _ = tiny_space
    records = [_record("a", 0.1), _record("b", 0.2), _record("c", 0.3), _record("d", 0.4)]
    for confirm, kept in ((Confirm(top_k=3, seeds=1), {"a", "b", "c"}), (Confirm(top_k=3, seeds=0), {"a"})):
        changes = dict(output_dir=str(tmp_path / str(confirm.seeds)), storage_path=str(tmp_path / "ray"))
        sweep = _sweep(space, records, keep_best_adapters=1, confirm=confirm, **changes)
        for r in records:
            (Path(trial_dir(str(sweep.dir), r.trial_id)) / "final").mkdir(parents=True)
        prune_checkpoints(sweep)
        assert {r.trial_id for r in records if (Path(trial_dir(str(sweep.dir), r.trial_id)) / "final").is_dir()} == kept


def test_boundary_advice_reads_the_learning_rate_at_its_stages_batch(tiny_space) -> None:
    """The demo's rates [1e-4, 3e-3] were searched at effective batch 16 (sqrt rule). A winner at
    batch 32 trained at 4.2e-3 is inside the range there (2.97e-3); one at batch 8 trained at
    2.12e-3 is its top (3e-3); the top rank and the top epochs are flagged as they are."""
    from raytune_qvl.sweep.outputs import boundary_advice

    space, _ = tiny_space
    lr, batch, rank, epochs = "training.learning_rate", "effective_batch", "lora.r", "training.num_epochs"

    def advice(point: dict) -> list[str]:
        return boundary_advice(space, TrialRecord("t", "s", {}, {}, 0.1, "completed", point=point), lr_batch=16)

    inside = advice({lr: 4.2e-3, batch: 32, rank: 16, epochs: 4})
    assert inside == ["effective_batch 32 is the top of its range [8, 32]: try up to 64"]  # the rate is not
    top_lr, bottom_batch = advice({lr: 3e-3 * (8 / 16) ** 0.5, batch: 8, rank: 16, epochs: 4})
    assert bottom_batch == "effective_batch 8 is the bottom of its range [8, 32]: try down to 4"
    assert top_lr.startswith(f"{lr} 0.00212132 at effective batch 8 (0.003 at the stage's 16) is the top")
    edges = advice({lr: 1e-3, batch: 16, rank: 32, epochs: 6})
    assert edges == [
        "lora.r 32 is the top of its range [8, 32]: try up to 64",
        "training.num_epochs 6 is the top of its range [3, 6]: try up to 8",
    ]


def test_the_sweeps_importance_study_holds_full_budgets_only() -> None:
    """A trial ASHA stopped scored a shorter budget: it is not in the study the importances and the
    coordinates are drawn from (a confirmation run is: a full budget with another seed)."""
    from raytune_qvl.track.plots import sweep_study

    def trial(name: str, value: float, status: str, lr: float) -> TrialRecord:
        point = {"training.learning_rate": lr, "lora.r": 8}
        return TrialRecord(name, "stage1-training_learning_rate", point, {}, value, status, point=point)

    records = [
        trial("full", 0.2, "completed", 1e-3),
        trial("short", 0.1, "stopped", 3e-3),
        trial("again", 0.21, "confirmation", 1e-3),
        trial("broken", 0.05, "failed", 1e-4),
    ]
    study = sweep_study(records, "min")
    assert sorted(t.value for t in study.trials) == [0.2, 0.21] and study.best_value == 0.2
