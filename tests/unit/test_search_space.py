"""Search-space files: the shipped ones load; bad ones are refused with clear messages; stages
and the arithmetic from a sampled point to a config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raytune_qvl.errors import ConfigError
from raytune_qvl.sweep.load import load_search_space
from raytune_qvl.sweep.points import point_overrides, trial_config
from raytune_qvl.sweep.space import EFFECTIVE_BATCH, LR_FACTOR, stages

from conftest import ROOT

SPACES = ROOT / "search_spaces"


@pytest.mark.parametrize("name", ["ocr_doc", "ocr_formula", "general_vqa", "tiny_cpu"])
def test_shipped_spaces_load(name: str, tiny_assets: Path, in_root: Path) -> None:
    space, base = load_search_space(SPACES / f"{name}.yaml", check_files=name == "tiny_cpu")
    assert list(space.parameters) == ["training.learning_rate", "lora.r", EFFECTIVE_BATCH, "training.num_epochs"]
    assert [s.name for s in stages(space)] == list(space.parameters)
    expected_metric = {
        "ocr_doc": "eval_cer",
        "ocr_formula": "eval_ned",
        "general_vqa": "eval_anls",
        "tiny_cpu": "eval_cer",
    }[name]
    assert space.metric == expected_metric and space.mode == ("max" if name == "general_vqa" else "min")
    if name != "tiny_cpu":
        assert base.model.name == "Qwen/Qwen2.5-VL-7B-Instruct" and space.resources.use_gpu
    assert Path(space.storage_path).is_absolute() and Path(space.output_dir).is_absolute()


def test_variant_space_searches_lora_variants_after_the_documented_order(in_root: Path) -> None:
    space, base = load_search_space(SPACES / "ocr_doc_variants.yaml", check_files=False)
    names = [s.name for s in stages(space)]
    assert names[:4] == ["training.learning_rate", "lora.r", EFFECTIVE_BATCH, "training.num_epochs"]
    assert names[4:] == [
        "lora.init_lora_weights",
        "lora.use_dora",
        "lora.loraplus_lr_ratio",
        "training.vision_lr_ratio",
    ]
    assert base.lora.vision_lora.enabled  # the vision rate has something to act on
    assert space.parameters["lora.loraplus_lr_ratio"].log  # an optional number is searched as a number


def test_seed_starting_points() -> None:
    """The starting points are the seed's table."""
    table = {
        "ocr_doc": (32, 64, 2e-4, 0.05, 2048),
        "ocr_formula": (64, 128, 1e-4, 0.1, 4096),
        "general_vqa": (16, 32, 2e-4, 0.03, 1024),
    }
    for name, (r, alpha, lr, warmup, length) in table.items():
        _, base = load_search_space(SPACES / f"{name}.yaml", check_files=False)
        assert (
            base.lora.r,
            base.lora.lora_alpha,
            base.training.learning_rate,
            base.training.warmup_ratio,
            base.data.max_length,
        ) == (r, alpha, lr, warmup, length)


def _space(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((SPACES / "tiny_cpu.yaml").read_text())
    raw["base"] = {k: str(ROOT / v) for k, v in raw["base"].items()}
    if "parameters" in changes:
        raw["trials_per_stage"] = 2
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


BAD = [
    # the square-root rule's rate at batch 32 from 16 is 1/sqrt(2) of the linear rule's: 0.2 cannot reach it
    ({"lr_scaling": {"rule": "sqrt", "local_search": 0.2}}, ["lr_scaling.local_search", "set it to at least 0.41"]),
    (
        {"parameters": {"training.learning_rate": {"choices": [9e-3]}, "effective_batch": {"choices": [8, 32]}}},
        ["lr_scaling", "can reach learning rate 0.0191 (> 0.01)"],
    ),
    ({"pruner": {"type": "MedianPruner"}}, ["pruner", "ignores Optuna pruners", "asha"]),
    ({"stratgy": "staged"}, ["stratgy", "did you mean 'strategy'"]),
    ({"strategy": "grid"}, ["strategy", "'staged', 'joint' or 'random'"]),
    (
        {"parameters": {"training.learnin_rate": {"choices": [1e-4]}}},
        ["parameters.training.learnin_rate", "did you mean 'training.learning_rate'"],
    ),
    ({"parameters": {"training.learning_rate": {"low": 1e-3, "high": 1e-4}}}, ["low must be < high"]),
    (
        {"parameters": {"training.learning_rate": {"low": 0.0, "high": 1e-3, "log": True}}},
        ["a log range needs low > 0"],
    ),
    ({"parameters": {"training.learning_rate": {"choices": [1e-4], "low": 1e-5}}}, ["either choices or low/high"]),
    ({"parameters": {"lora.r": {"choices": [8, 8.5]}}}, ["lora.r is an integer"]),
    ({"parameters": {"lora.r": {"choices": [8, 512]}}}, ["parameters.lora.r", "must be <= 256"]),
    ({"parameters": {"training.learning_rate": {"choices": [0.5]}}}, ["must be <= 0.01"]),
    (
        {"parameters": {"effective_batch": {"choices": [16, 18]}}},
        ["effective batch 18 is not a multiple of micro batch 8 x 1 workers"],  # tiny_cpu: micro 8
    ),
    ({"parameters": {"model.attn_implementation": {"low": 1, "high": 2}}}, ["not numeric: use choices"]),
    ({"metric": "eval_acc"}, ["metric", "not a metric the loop reports"]),
    ({"metric": "eval_loss", "mode": "max"}, ["mode", "mode must be min"]),
    ({"metric": "eval_anls", "mode": "max"}, ["task ocr_doc reports"]),
    ({"trials_per_stage": {"lora.rank": 3}}, ["trials_per_stage.lora.rank", "not one of the parameters"]),
    (
        {"parameters": {"lora.r": {"choices": [4, 1000]}, "training.lr": {"choices": [1e-4]}}},
        ["lora.r", "must be <= 256", "training.lr", "not a parameter"],
    ),
    ({"overrides": {"training.lerning_rate": 1e-4}}, ["overrides.training.lerning_rate", "did you mean"]),
    ({"overrides": {"lora.r": 0}}, ["overrides.lora.r", "must be >= 1"]),
    ({"asha": {"time_attr": "training_iteration"}}, ["asha.time_attr", "'epoch' or 'samples_seen'"]),
    ({"asha": {"grace_period": 2, "max_t": 1}}, ["asha.max_t", "must be > asha.grace_period"]),
    ({"base": None}, ["base", "Field required"]),
    (
        {"resources": {"workers_per_trial": 2, "use_gpu": True, "gpus_per_worker": 0.5}},
        ["resources.gpus_per_worker", "whole number with 2 workers per trial"],
    ),
]


@pytest.mark.parametrize(("changes", "fragments"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_search_spaces(
    changes: dict, fragments: list[str], tiny_assets: Path, in_root: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        load_search_space(_space(tmp_path, **changes))
    text = str(info.value)
    for fragment in fragments:
        assert fragment.lower() in text.lower(), text
    assert all(line.startswith("error: ") and "\n" not in line for line in info.value.lines())


def test_point_to_config_arithmetic(tiny_assets: Path, in_root: Path, tmp_path: Path) -> None:
    space, base = load_search_space(SPACES / "tiny_cpu.yaml")
    batch_stage = stages(space)[2]
    assert set(batch_stage.params) == {EFFECTIVE_BATCH, LR_FACTOR}  # a scaling rule + local search
    point = {
        "training.learning_rate": 1e-3,
        "lora.r": 16,
        EFFECTIVE_BATCH: 32,
        "training.num_epochs": 2,
        LR_FACTOR: 1.1,
    }
    linear = space.model_copy(update={"lr_scaling": space.lr_scaling.model_copy(update={"rule": "linear"})})
    over = point_overrides(linear, base, point, lr_batch=16)
    assert over["lora.lora_alpha"] == 32  # alpha follows the rank (ratio 2)
    assert over["training.gradient_accumulation_steps"] == 4  # 32 / (8 micro x 1 worker)
    assert over["training.learning_rate"] == pytest.approx(1e-3 * 32 / 16 * 1.1)
    # the default for Adam: the square-root rule
    assert space.lr_scaling.rule == "sqrt"
    over = point_overrides(space, base, point, lr_batch=16)
    assert over["training.learning_rate"] == pytest.approx(1e-3 * (32 / 16) ** 0.5 * 1.1)
    cfg = trial_config(space, base, point, 16, str(tmp_path / "t"), eval_steps=3)
    assert cfg.training.eval_steps == cfg.training.save_steps == 3
    assert cfg.output.report_to == "none" and cfg.ray.num_workers == 1
    assert cfg.training.metric_for_best_model == space.metric
    # joint search samples the learning rate directly: no rescaling
    joint = space.model_copy(update={"strategy": "joint"})
    assert point_overrides(joint, base, point, lr_batch=16)["training.learning_rate"] == pytest.approx(1e-3)
    assert [s.name for s in stages(joint)] == ["joint"]


def test_sweep_dry_run(tiny_assets: Path) -> None:
    from conftest import run_cli

    result = run_cli("raytune_qvl.sweep", str(SPACES / "tiny_cpu.yaml"), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "stage1-training_learning_rate: 4 trials" in out and "stage4-training_num_epochs" in out
    assert "batch    32: accumulation   4" in out  # micro batch 8 x 1 worker
    assert "concurrent trials: 2" in out
    bad = run_cli("raytune_qvl.sweep", str(SPACES / "tiny_cpu.yaml"), "--dry-run", "stratgy=joint")
    assert bad.returncode == 2 and "did you mean 'strategy'" in bad.stderr and "Traceback" not in bad.stderr


def test_command_line_overrides_reach_dotted_mappings(tiny_assets: Path, in_root: Path) -> None:
    from raytune_qvl.sweep.load import load_with_overrides

    overrides = [
        "overrides.training.learning_rate=5e-4",
        "parameters.training.learning_rate.choices=[1e-3, 2e-3]",
        "trials_per_stage.lora.r=2",
        "resources.max_concurrent_trials=1",
        "strategy=staged",
    ]
    space, base = load_with_overrides(str(SPACES / "tiny_cpu.yaml"), overrides)
    assert space.overrides["training.learning_rate"] == pytest.approx(5e-4)
    assert base.training.learning_rate == pytest.approx(5e-4)
    assert space.parameters["training.learning_rate"].choices == [1e-3, 2e-3]
    assert space.trials_per_stage["lora.r"] == 2
    assert space.resources.max_concurrent_trials == 1
    with pytest.raises(ConfigError) as info:
        load_with_overrides(str(SPACES / "tiny_cpu.yaml"), ["overrides.data.train_path=/nonexistent/train.jsonl"])
    assert "overrides.data.train_path" in str(info.value) and "not found" in str(info.value)


@pytest.mark.parametrize("optimizer, rule", [("AdamW", "sqrt"), ("SGD", "linear"), (None, "sqrt")])
def test_the_default_scaling_rule_is_the_base_optimizers(
    optimizer: str | None, rule: str, tmp_path: Path, in_root: Path
) -> None:
    """lr_scaling.rule left out: the square root for Adam (and no optimizer block: AdamW is used),
    linear for SGD; a rule written in the file is kept."""
    import json

    raw = yaml.safe_load((SPACES / "tiny_cpu.yaml").read_text())
    ds = json.loads((ROOT / raw["base"]["deepspeed"]).read_text())
    ds.pop("optimizer", None)
    if optimizer:
        ds["optimizer"] = {"type": optimizer, "params": {"lr": "auto", "weight_decay": "auto"}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    raw["base"] = {k: str(ROOT / v) for k, v in raw["base"].items()} | {"deepspeed": str(tmp_path / "ds.json")}
    raw["lr_scaling"] = {"local_search": 0.5}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(raw))
    space, _ = load_search_space(tmp_path / "space.yaml", check_files=False)
    assert space.lr_scaling.rule == rule
    raw["lr_scaling"]["rule"] = "none"
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(raw))
    assert load_search_space(tmp_path / "space.yaml", check_files=False)[0].lr_scaling.rule == "none"
