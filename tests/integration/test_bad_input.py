"""Malformed configs, search spaces and data files through the real CLIs: each exits non-zero
(2 for usage and config errors, 1 for data that cannot be trained on), prints one line naming the
culprit and the fix, no traceback, and leaves no output behind."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import ROOT, TINY_LORA, TINY_TRAIN, ZERO2, run_cli, tiny_space

pytestmark = pytest.mark.bad_input

Case = Callable[[Path], list[str]]


def _train(
    tmp: Path, *overrides: str, config: Path = TINY_TRAIN, lora: Path = TINY_LORA, ds: Path | None = ZERO2
) -> list[str]:
    args = ["raytune_qvl.train", "--config", str(config), "--lora_config", str(lora)]
    if ds is not None:
        args += ["--deepspeed", str(ds)]
    return args + [
        f"output.dir={tmp / 'out'}",
        f"ray.storage_path={tmp / 'ray'}",
        f"output.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        *overrides,
    ]


def _file(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _ds(tmp: Path, text: str) -> list[str]:
    return _train(tmp, ds=_file(tmp, "ds.json", text))


def _space(tmp: Path, **changes) -> list[str]:
    return ["raytune_qvl.sweep", str(tiny_space(tmp, **changes))]


def _data(tmp: Path, lines: list[str] | bytes, *extra: str, name: str = "train.jsonl") -> list[str]:
    folder = tmp / "data"
    folder.mkdir(exist_ok=True)
    src = ROOT / ".assets" / "data" / "forms" / "images" / "train_00000.png"
    shutil.copy(src, folder / "ok.png")
    path = folder / name
    path.write_bytes(lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode())
    return _train(tmp, f"data.train_path={path}", f"data.eval_path={path}", *extra)


GOOD = json.dumps({"image": "ok.png", "answer": "total 42"})

CASES: list[tuple[str, Case, int, list[str]]] = [
    (
        "typo_key",
        lambda t: _train(t, "training.learning_rat=1e-4"),
        2,
        ["training.learning_rat", "did you mean 'training.learning_rate'"],
    ),
    (
        "wrong_type",
        lambda t: _train(t, "training.num_epochs=three"),
        2,
        ["training.num_epochs", "must be an integer", "three"],
    ),
    (
        "lr_too_high",
        lambda t: _train(t, "training.learning_rate=0.5"),
        2,
        ["training.learning_rate", "must be <= 0.01"],
    ),
    ("rank_zero", lambda t: _train(t, "lora.r=0"), 2, ["lora.r", "must be >= 1"]),
    (
        "bf16_and_fp16",
        lambda t: _train(t, "environment.bf16=true", "environment.fp16=true"),
        2,
        ["bf16 and fp16 cannot both be true"],
    ),
    ("unknown_section", lambda t: _train(t, "optimizer.lr=1"), 2, ["optimizer.lr", "unknown section"]),
    ("override_without_value", lambda t: _train(t, "training.learning_rate"), 2, ["section.key=value"]),
    (
        "yaml_syntax",
        lambda t: _train(t, config=_file(t, "c.yaml", "training:\n  learning_rate: [1e-4\n")),
        2,
        ["c.yaml:", "invalid YAML"],
    ),
    ("yaml_empty", lambda t: _train(t, config=_file(t, "c.yaml", "")), 2, ["c.yaml", "is empty"]),
    ("yaml_list", lambda t: _train(t, config=_file(t, "c.yaml", "- a\n")), 2, ["must be a mapping of sections"]),
    (
        "yaml_latin1",
        lambda t: _train(t, config=_file(t, "c.yaml", "# r\xe9sum\xe9\ntraining: {}\n".encode("latin-1"))),
        2,
        ["c.yaml", "not UTF-8", "save it as UTF-8"],
    ),
    ("config_missing", lambda t: _train(t, config=t / "nope.yaml"), 2, ["nope.yaml", "training config not found"]),
    (
        "yaml_duplicate_key",
        lambda t: _train(t, config=_file(t, "c.yaml", "training:\n  num_epochs: 1\n  num_epochs: 2\n")),
        2,
        ["duplicate key 'num_epochs'"],
    ),
    (
        "lora_extra_section",
        lambda t: _train(t, lora=_file(t, "l.yaml", "lora: {r: 8}\nextra: {a: 1}\n")),
        2,
        ["l.yaml", "the LoRA file holds one section"],
    ),
    ("lora_no_targets", lambda t: _train(t, "lora.target_modules=[]"), 2, ["lora.target_modules", "must not be empty"]),
    ("ds_syntax", lambda t: _ds(t, '{"zero_optimization": {"stage": 2,}}'), 2, ["ds.json:", "invalid JSON"]),
    ("ds_truncated", lambda t: _ds(t, ZERO2.read_text()[:200]), 2, ["ds.json:", "invalid JSON"]),
    (
        "ds_contradiction",
        lambda t: _ds(t, json.dumps({"gradient_clipping": 0.5})),
        2,
        ["gradient_clipping", "contradicts training.max_grad_norm"],
    ),
    (
        "ds_unknown_auto",
        lambda t: _ds(t, json.dumps({"zero_optimization": {"stage": 2, "mystery": "auto"}})),
        2,
        ["zero_optimization.mystery", "no rule fills"],
    ),
    ("ds_missing", lambda t: _train(t, ds=t / "nope.json"), 2, ["nope.json", "DeepSpeed config not found"]),
    (
        "model_missing",
        lambda t: _train(t, f"model.name={t / 'no-model'}"),
        2,
        ["model.name", "local model folder not found"],
    ),
    (
        "bad_metric",
        lambda t: _train(t, "training.metric_for_best_model=eval_accuracy"),
        2,
        ["metric_for_best_model", "not a metric the loop reports"],
    ),
    (
        "image_sizes",
        lambda t: _train(t, "data.min_image_size=4000"),
        2,
        ["data.min_image_size", "must be <= data.max_image_size"],
    ),
    (
        "space_pruner",
        lambda t: _space(t, pruner={"type": "HyperbandPruner"}),
        2,
        ["pruner", "ignores Optuna pruners", "asha"],
    ),
    (
        "space_unknown_parameter",
        lambda t: _space(t, parameters={"lora.rank": {"choices": [8]}}, trials_per_stage=1),
        2,
        ["parameters.lora.rank", "not a parameter"],
    ),
    (
        "space_bad_domain",
        lambda t: _space(t, parameters={"training.learning_rate": {"low": 1e-3, "high": 1e-4}}, trials_per_stage=1),
        2,
        ["low must be < high"],
    ),
    (
        "space_batch_not_dividing",
        lambda t: _space(t, parameters={"effective_batch": {"choices": [16, 18]}}, trials_per_stage=1),
        2,
        ["effective batch 18 is not a multiple"],
    ),
    ("space_mode", lambda t: _space(t, mode="max"), 2, ["mode", "must be min"]),
    (
        "space_empty",
        lambda t: ["raytune_qvl.sweep", str(_file(t, "space.yaml", "\n"))],
        2,
        ["search-space file is empty"],
    ),
    (
        "space_base_missing",
        lambda t: _space(t, base={"config": str(t / "nope.yaml")}),
        2,
        ["nope.yaml", "training config not found"],
    ),
    ("space_override_without_value", lambda t: [*_space(t), "strategy"], 2, ["an override is key=value"]),
    (
        "space_override_typo",
        lambda t: [*_space(t), "resources.max_concurrent_trial=2"],
        2,
        ["resources.max_concurrent_trial", "did you mean 'resources.max_concurrent_trials'"],
    ),
    (
        "data_truncated_jsonl",
        lambda t: _data(t, [GOOD] * 4 + ['{"image": "ok.png", "ans', '{"image": "ok']),
        1,
        ["33.3% of records are bad", "2 invalid_json (lines 5, 6)", "max_bad_fraction"],
    ),
    (
        "data_missing_images",
        lambda t: _data(t, [json.dumps({"image": f"gone{i}.png", "answer": "x"}) for i in range(3)]),
        1,
        ["no usable records", "3 missing_image"],
    ),
    (
        "data_corrupt_images",
        lambda t: (
            _file(t / "data", "bad.png", b"\x89PNG broken") if (t / "data").mkdir() is None else None,
            _data(t, [json.dumps({"image": "bad.png", "answer": "x"})] * 2),
        )[1],
        1,
        ["2 corrupt_image"],
    ),
    (
        "data_utf16",
        lambda t: _data(t, ("\n".join([GOOD] * 3) + "\n").encode("utf-16")),
        1,
        ["UTF-16", "save it as UTF-8"],
    ),
    (
        "data_latin1_lines",
        lambda t: _data(
            t, ("\n".join([GOOD, '{"image": "ok.png", "answer": "caf\xe9"}'] * 2) + "\n").encode("latin-1")
        ),
        1,
        ["50.0% of records are bad", "2 not_utf8"],
    ),
    ("data_empty", lambda t: _data(t, b""), 1, ["the data file is empty"]),
    (
        "data_json_object",
        lambda t: _data(t, json.dumps({"image": "ok.png", "answer": "x"}).encode(), name="train.json"),
        1,
        ["must hold a list of records"],
    ),
    (
        "data_no_assistant",
        lambda t: _data(
            t, [json.dumps({"messages": [{"role": "user", "content": "<image>hi"}], "images": ["ok.png"]})] * 2
        ),
        1,
        ["2 no_assistant_turn"],
    ),
    ("data_all_too_long", lambda t: _data(t, [GOOD] * 2, "data.max_length=32"), 1, ["2 too_long"]),
    (
        "output_under_a_file",
        lambda t: _train(t, f"output.dir={_file(t, 'afile', 'x') / 'out'}"),
        2,
        ["output.dir", "is a file, not a folder"],
    ),
    (
        "tracking_unreachable",
        lambda t: _train(t, "output.tracking_uri=http://127.0.0.1:9"),
        2,
        ["tracking server unreachable", "start it or fix the URI"],
    ),
]


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize(("name", "build", "code", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(name: str, build: Case, code: int, fragments: list[str], tiny_assets: Path, tmp_path: Path) -> None:
    args = build(tmp_path)
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    result = run_cli(*args, env={"TRANSFORMERS_VERBOSITY": "error"}, timeout=300)
    assert result.returncode == code, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]
    # nothing half-written: no run folder, no Ray storage, no sweep folder, no MLflow store
    created = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")} - before
    assert not created, created


def test_an_unbuildable_deepspeed_op_stops_the_run_before_any_worker(tiny_assets: Path, tmp_path: Path) -> None:
    """ZeRO-3 offload needs DeepSpeed's cpu_adam op: on a machine that can neither load a prebuilt
    one nor compile it (no ninja, no compiler on PATH), the run stops at pre-flight with one line
    naming the op, what is missing and the fix, and writes nothing. (ninja is looked for in the
    interpreter's own scripts folder too, as in an activated venv.)"""
    from conftest import ZERO3

    from raytune_qvl.train.ops import _installed_ops

    if _installed_ops().get("cpu_adam"):
        pytest.skip("this DeepSpeed install has cpu_adam prebuilt")
    empty = tmp_path / "bin"
    empty.mkdir()
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    result = run_cli(*_train(tmp_path, ds=ZERO3), env={"PATH": str(empty), "TRANSFORMERS_VERBOSITY": "error"})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert "ds_config_zero3_offload.json: optimizer" in lines[0] and "cpu_adam" in lines[0], lines[0]
    assert "C++ compiler" in lines[0] and "DS_BUILD_CPU_ADAM=1" in lines[0]
    # the interpreter's own scripts folder is searched without an activated venv: its ninja is found
    venv_ninja = (Path(sys.executable).parent / "ninja").exists()
    assert ("ninja (pip install ninja)" in lines[0]) is not venv_ninja, lines[0]
    assert {p.relative_to(tmp_path) for p in tmp_path.rglob("*")} == before
