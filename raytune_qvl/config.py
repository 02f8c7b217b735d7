"""The training configuration: the seed's training YAML + LoRA YAML + DeepSpeed JSON as one typed,
validated object, with `section.key=value` command-line overrides.

Paths inside the files are relative to the working directory (as in the seed) and are made
absolute on load, because Ray workers run elsewhere. Validation collects every problem and
raises one `ConfigError` whose lines each name the file, the key, the value and the rule.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raytune_qvl.errors import ConfigError, Problem

__all__ = [
    "Config",
    "ConfigPaths",
    "ModelConfig",
    "DataConfig",
    "TrainingConfig",
    "OutputConfig",
    "EnvironmentConfig",
    "RayConfig",
    "EvaluationConfig",
    "LoraConfig",
    "VisionLoraConfig",
    "EVAL_METRICS",
    "TASK_METRICS",
    "TASKS",
    "DEFAULT_PROMPTS",
    "load_config",
    "load_yaml",
    "load_json",
    "parse_override",
    "apply_overrides",
    "validate_config",
    "flatten",
    "metric_mode",
    "pydantic_problems",
    "closest",
    "field_at",
    "metric_reported",
]

log = logging.getLogger("raytune_qvl")

# Every metric the loop reports at evaluation, with the direction that is better.
EVAL_METRICS: dict[str, Literal["min", "max"]] = {
    "eval_loss": "min",
    "eval_cer": "min",  # character error rate (documents)
    "eval_wer": "min",  # word error rate (documents)
    "eval_ned": "min",  # normalized edit distance after LaTeX normalization (formulas)
    "eval_anls": "max",  # average normalized Levenshtein similarity (visual QA)
    "eval_exact_match": "max",
}
# The generation metrics each task reports (eval_loss is always reported).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "ocr_doc": ("eval_cer", "eval_wer", "eval_exact_match"),
    "ocr_formula": ("eval_ned", "eval_exact_match"),
    "general_vqa": ("eval_anls", "eval_exact_match"),
}
TASKS = tuple(TASK_METRICS)
# The instruction a record without a prompt gets (visual QA records must bring their question).
DEFAULT_PROMPTS: dict[str, str] = {
    "ocr_doc": "Read the text in the image.",
    "ocr_formula": "Write the formula in the image as LaTeX.",
}
# wandb and tensorboard are accepted for the seed's files and logged to MLflow with a warning
REPORT_TO = ("mlflow", "none", "wandb", "tensorboard")


def metric_mode(metric: str) -> Literal["min", "max"]:
    """'min' for losses and error rates, 'max' for similarities."""
    return EVAL_METRICS[metric]


def metric_reported(metric: str, evaluation: "EvaluationConfig") -> str | None:
    """Why the loop would not report `metric` under these evaluation settings (None: it does)."""
    if metric == "eval_loss":
        return None
    if evaluation.generation_samples == 0:
        return f"{metric} comes from generation eval: set evaluation.generation_samples > 0"
    if evaluation.task != "auto" and metric not in TASK_METRICS[evaluation.task]:
        return f"task {evaluation.task} reports {', '.join(('eval_loss',) + TASK_METRICS[evaluation.task])}"
    return None


class _Section(BaseModel):
    # strict: a string is never silently turned into a number or a bool; unknown keys are errors
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# ----------------------------------------------------------------------------- training YAML


class ModelConfig(_Section):
    name: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # hub id or local checkpoint folder
    revision: str = "main"
    torch_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: Literal["flash_attention_2", "sdpa", "eager"] = "flash_attention_2"
    trust_remote_code: bool = False  # Qwen2.5-VL is native in transformers: no remote code needed


class PreprocessingConfig(_Section):
    shuffle: bool = True  # shuffle the training order every epoch
    seed: int = 42  # data-order seed


class DataConfig(_Section):
    train_path: str = "./data/train.jsonl"
    eval_path: str | None = "./data/eval.jsonl"
    max_length: int = Field(2048, ge=32)  # tokens; longer samples are dropped, never cut
    max_image_size: int = Field(1280, ge=28)  # long side in px of a square image: max_pixels = size**2
    min_image_size: int = Field(256, ge=28)  # likewise: min_pixels = size**2
    image_factor: int = Field(28, ge=1)  # patch_size * spatial_merge_size of the vision tower
    num_workers: int = Field(4, ge=0)  # DataLoader processes per Ray worker
    preprocessing: PreprocessingConfig = PreprocessingConfig()
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)  # more bad records than this: stop before training
    allow_outside_paths: bool = False  # image paths may escape the data file's folder
    cache_dir: str | None = None  # processed-data cache; default ~/.cache/raytune_qvl/data
    system_prompt: str | None = None  # None: the chat template's default system prompt


class TrainingConfig(_Section):
    num_epochs: int = Field(3, ge=1)
    per_device_train_batch_size: int = Field(2, ge=1)
    per_device_eval_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)  # effective batch = micro x workers x this
    learning_rate: float = Field(2.0e-4, ge=1e-7, le=1e-2)  # LoRA: 1e-4 .. 3e-4
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0)  # 0 disables clipping
    warmup_ratio: float = Field(0.05, ge=0.0, le=0.5)
    lr_scheduler_type: Literal["cosine", "linear", "constant_with_warmup", "constant"] = "cosine"
    logging_steps: int = Field(10, ge=1)  # optimizer steps between train-loss reports
    eval_steps: int = Field(200, ge=1)  # optimizer steps between evaluations (and one at the end)
    save_steps: int = Field(500, ge=1)  # optimizer steps between checkpoints (and one at the end)
    save_total_limit: int = Field(3, ge=1)  # full checkpoints kept; the best adapter is kept aside
    metric_for_best_model: str = "eval_loss"
    greater_is_better: bool | None = None  # None: from the metric (min for losses/error rates)
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps (schedule too)
    eval_on_start: bool = False  # evaluate the untrained model at step 0


class OutputConfig(_Section):
    dir: str = "./outputs/qwen25vl-lora-ocr"
    logging_dir: str = "./logs/qwen25vl-lora-ocr"
    report_to: str = "mlflow"  # mlflow | none (the seed's wandb/tensorboard: MLflow, with a warning)
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment_name: str = "raytune_qvl"
    run_name: str | None = None  # None: the output folder's name


class EnvironmentConfig(_Section):
    seed: int = 42  # LoRA initialisation, dropout and data order
    dataloader_pin_memory: bool = True
    bf16: bool = True
    fp16: bool = False
    gradient_checkpointing: bool = True  # trade compute for activation memory
    deepspeed: str | None = "./configs/ds_config_zero2.json"  # --deepspeed wins over this


class RayConfig(_Section):
    address: str | None = None  # None: RAY_ADDRESS if set, else a new local cluster; "auto": join one
    num_workers: int = Field(1, ge=1)  # Ray Train workers = DeepSpeed world size
    use_gpu: bool = False  # one GPU per worker unless resources_per_worker says otherwise
    resources_per_worker: dict[str, float] | None = None  # e.g. {CPU: 8, GPU: 1}
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    storage_path: str = "./ray_results"  # checkpoints and run state; shared storage on multi-node
    shared_storage: bool = False  # storage_path is a filesystem every node mounts (checked at start)
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint (-1: forever)


class EvaluationConfig(_Section):
    task: Literal["auto", "ocr_doc", "ocr_formula", "general_vqa"] = "auto"  # auto: from the data
    generation_samples: int = Field(32, ge=0)  # fixed, seeded eval subset decoded greedily; 0: off
    generation_every: int = Field(1, ge=1)  # decode at every N-th evaluation (it costs more than loss)
    max_new_tokens: int = Field(128, ge=1)
    label_mask_samples: int = Field(3, ge=0)  # samples rendered in the label-mask view


# ----------------------------------------------------------------------------- LoRA YAML


class VisionLoraConfig(_Section):
    enabled: bool = False  # LoRA on the vision tower too
    vision_target_modules: list[str] = Field(default_factory=lambda: ["qkv"], min_length=1)
    vision_r: int = Field(8, ge=1, le=256)
    vision_alpha: int = Field(16, ge=1)


class LoraConfig(_Section):
    r: int = Field(32, ge=1, le=256)  # LoRA rank
    lora_alpha: int = Field(64, ge=1)  # scale = lora_alpha / r; alpha = 2r by convention
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )  # matched in the language model only; the vision tower is governed by vision_lora
    modules_to_save: list[str] | None = None  # trained in full and saved with the adapter
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    vision_lora: VisionLoraConfig = VisionLoraConfig()


# ----------------------------------------------------------------------------- the whole config


class ConfigPaths(BaseModel):
    """Where each part came from (absolute paths), for messages and for writing configs back."""

    training: str | None = None
    lora: str | None = None
    deepspeed: str | None = None


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    output: OutputConfig = OutputConfig()
    environment: EnvironmentConfig = EnvironmentConfig()
    ray: RayConfig = RayConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    lora: LoraConfig = LoraConfig()
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # the JSON as written ("auto" unfilled)
    paths: ConfigPaths = ConfigPaths()

    @property
    def greater_is_better(self) -> bool:
        if self.training.greater_is_better is not None:
            return self.training.greater_is_better
        return metric_mode(self.training.metric_for_best_model) == "max"

    def training_dict(self) -> dict[str, Any]:
        """The training YAML's content (sections as the seed lays them out)."""
        return {name: getattr(self, name).model_dump() for name in TRAINING_SECTIONS}

    def lora_dict(self) -> dict[str, Any]:
        return {"lora": self.lora.model_dump()}


# the training YAML's sections, in the seed's order: all but the LoRA YAML's, the DeepSpeed JSON and the file paths
TRAINING_SECTIONS = tuple(name for name in Config.model_fields if name not in ("lora", "deepspeed", "paths"))
SECTIONS = TRAINING_SECTIONS + ("lora", "deepspeed")

# ----------------------------------------------------------------------------- file loading


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 floats (`2e-4` is a number, not a string) and no duplicate keys."""


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, regexp) for tag, regexp in _Loader.yaml_implicit_resolvers.get(_first, []) if tag != "tag:yaml.org,2002:float"
    ]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise ConfigError([Problem(str(path), "", f"{what} not found: check the path", show_value=False)])
    if path.is_dir():
        raise ConfigError([Problem(str(path), "", f"{what} is a folder, expected a file", show_value=False)])
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(str(path), "", f"not UTF-8 text (byte {exc.start}): save it as UTF-8", show_value=False)]
        ) from None
    except OSError as exc:
        raise ConfigError([Problem(str(path), "", f"cannot read: {exc.strerror}", show_value=False)]) from None
    if not text.strip():
        raise ConfigError([Problem(str(path), "", f"{what} is empty", show_value=False)])
    return text


def parse_yaml_text(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([Problem(where, "", f"invalid YAML: {problem}", show_value=False)]) from None


def load_yaml(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """A YAML file that must hold a mapping, read safely."""
    path = Path(path)
    data = parse_yaml_text(_read_text(path, what), str(path))
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "", f"{what} must be a mapping of sections", type(data).__name__)])
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_json(path: str | os.PathLike, what: str = "DeepSpeed config") -> dict[str, Any]:
    path = Path(path)
    text = _read_text(path, what)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError([Problem(f"{path}:{exc.lineno}:{exc.colno}", "", f"invalid JSON: {exc.msg}", show_value=False)]) from None
    except ValueError as exc:
        raise ConfigError([Problem(str(path), "", f"invalid JSON: {exc}", show_value=False)]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "", f"{what} must be a JSON object", type(data).__name__)])
    return data


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.learning_rate=1e-4` -> (["training", "learning_rate"], 0.0001). Values are YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")) or "." not in key:
        raise ConfigError(
            [Problem("command line", text, "an override is section.key=value, e.g. training.learning_rate=1e-4", show_value=False)]
        )
    value = parse_yaml_text(raw, f"command line {text!r}") if raw.strip() else None
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[tuple[list[str], Any]]) -> None:
    """Set each dotted key in a nested dict, creating intermediate mappings."""
    for parts, value in overrides:
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value


# ----------------------------------------------------------------------------- loading


def closest(name: str, options: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def _model_for(loc: Sequence[Any], root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic class holding the last key of a location like ("training", "learning_rat")."""
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


_RULES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
}


def _rule(err: Mapping[str, Any]) -> str:
    etype = err["type"]
    ctx = err.get("ctx") or {}
    if etype in _RULES:
        return _RULES[etype]
    if etype == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if etype == "greater_than":
        return f"must be > {ctx['gt']}"
    if etype == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if etype == "less_than":
        return f"must be < {ctx['lt']}"
    if etype == "literal_error":
        return f"must be one of {ctx['expected']}"
    if etype == "too_short":
        return "must not be empty"
    return err["msg"][0].lower() + err["msg"][1:]


def pydantic_problems(errors: Sequence[Mapping[str, Any]], source_of: Any, root: type[BaseModel] | None = None) -> list[Problem]:
    """pydantic errors as Problems; unknown keys get the closest valid key as a suggestion."""
    root = root or Config
    problems = []
    for err in errors:
        loc = list(err["loc"])
        key = ".".join(str(p) for p in loc)
        source = source_of(loc)
        if err["type"] == "extra_forbidden":
            section = _model_for(loc, root)
            options = list(section.model_fields) if section else []
            if section is Config:
                options = [s for s in SECTIONS if s not in ("deepspeed",)]
            guess = closest(str(loc[-1]), options)
            rule = "unknown key" + (f"; did you mean {'.'.join(map(str, loc[:-1] + [guess]))!r}?" if guess else "")
            if section is Config and str(loc[-1]) == "lora":
                rule = "the lora section belongs in the LoRA file (--lora_config)"
            problems.append(Problem(source, key, rule, err["input"]))
        elif err["type"] == "float_type" and isinstance(err["input"], str):
            problems.append(Problem(source, key, "must be a number, not a quoted string (write 2.0e-4 or 2e-4 unquoted)", err["input"]))
        else:
            problems.append(Problem(source, key, _rule(err), err["input"]))
    return problems


class _Sources:
    """Maps a key location to the file (or command line) it came from."""

    def __init__(self, files: Mapping[str, str], overridden: set[str]):
        self.files = files
        self.overridden = overridden

    def __call__(self, loc: Sequence[Any]) -> str:
        dotted = ".".join(str(p) for p in loc)
        for key in self.overridden:
            if dotted == key or dotted.startswith(key + "."):
                return "command line"
        return self.files.get(str(loc[0]), "command line") if loc else "command line"


def _abs(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().absolute())


def load_config(
    config_path: str | os.PathLike | None,
    lora_path: str | os.PathLike | None = None,
    deepspeed_path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    check_files: bool = True,
    world_size: int | None = None,
) -> Config:
    """Load, merge and validate. `--deepspeed` (deepspeed_path) wins over `environment.deepspeed`.

    Raises ConfigError listing every problem found. With `check_files`, referenced files
    (data, DeepSpeed JSON, a local model folder) must exist and the DeepSpeed JSON must be
    consistent with the training config.
    """
    problems: list[Problem] = []
    training_raw: dict[str, Any] = load_yaml(config_path, "training config") if config_path else {}
    lora_raw: dict[str, Any] = load_yaml(lora_path, "LoRA config") if lora_path else {}
    parsed_overrides = [parse_override(o) for o in overrides]

    files: dict[str, str] = {}
    for section in TRAINING_SECTIONS:
        files[section] = str(config_path) if config_path else "defaults"
    files["lora"] = str(lora_path) if lora_path else "defaults"

    # sections that are not ours, in the wrong file, or misspelt
    for key in list(training_raw):
        if key not in TRAINING_SECTIONS:
            guess = closest(str(key), TRAINING_SECTIONS)
            rule = (
                "the lora section belongs in the LoRA file (--lora_config)"
                if key == "lora"
                else "unknown section" + (f"; did you mean {guess!r}?" if guess else f"; sections are {', '.join(TRAINING_SECTIONS)}")
            )
            problems.append(Problem(str(config_path), str(key), rule, training_raw.pop(key), show_value=False))
    for key in list(lora_raw):
        if key != "lora":
            problems.append(
                Problem(str(lora_path), str(key), "unknown section; the LoRA file holds one section, lora", lora_raw.pop(key), show_value=False)
            )

    tree: dict[str, Any] = {**training_raw, "lora": lora_raw.get("lora", {})}
    for section in list(tree):
        if tree[section] is None:
            tree[section] = {}  # an empty section ("model:") means defaults

    ds_override = [(p, v) for p, v in parsed_overrides if p[0] == "deepspeed"]
    cfg_overrides = [(p, v) for p, v in parsed_overrides if p[0] != "deepspeed"]
    for parts, value in cfg_overrides:
        if parts[0] not in SECTIONS:
            guess = closest(parts[0], SECTIONS)
            problems.append(
                Problem("command line", ".".join(parts), "unknown section" + (f"; did you mean {guess!r}?" if guess else ""), value)
            )
    cfg_overrides = [(p, v) for p, v in cfg_overrides if p[0] in SECTIONS]
    apply_overrides(tree, cfg_overrides)
    sources = _Sources(files, {".".join(p) for p, _ in cfg_overrides})

    # the DeepSpeed JSON: --deepspeed, else environment.deepspeed
    env_section = tree.get("environment") if isinstance(tree.get("environment"), dict) else {}
    env_ds = env_section.get("deepspeed", EnvironmentConfig.model_fields["deepspeed"].default)
    ds_file = deepspeed_path if deepspeed_path is not None else env_ds
    ds_dict: dict[str, Any] = {}
    if isinstance(ds_file, str | os.PathLike):
        if deepspeed_path is not None:
            tree.setdefault("environment", {})
            if isinstance(tree["environment"], dict):
                tree["environment"]["deepspeed"] = str(deepspeed_path)
        if Path(ds_file).exists() or check_files:
            try:
                ds_dict = load_json(ds_file)
            except ConfigError as exc:
                problems.extend(exc.problems)
    apply_overrides(ds_dict, [(p[1:], v) for p, v in ds_override])

    # each section on its own, so one bad section does not hide the problems of the others
    sections: dict[str, BaseModel] = {}
    for name in TRAINING_SECTIONS + ("lora",):
        raw = tree.get(name, {})
        if not isinstance(raw, dict):
            problems.append(Problem(sources([name]), name, "must be a mapping of keys", raw))
            continue
        try:
            sections[name] = Config.model_fields[name].annotation.model_validate(raw)  # type: ignore[union-attr]
        except ValidationError as exc:
            errors = [{**e, "loc": (name, *e["loc"])} for e in exc.errors()]
            problems.extend(pydantic_problems(errors, sources))

    problems.extend(validate_config(sections, ds_dict, sources, check_files=check_files, world_size=world_size))
    if problems:
        raise ConfigError(problems)
    cfg = Config(
        **sections,
        deepspeed=ds_dict,
        paths=ConfigPaths(
            training=_abs(str(config_path)) if config_path else None,
            lora=_abs(str(lora_path)) if lora_path else None,
            deepspeed=_abs(str(ds_file)) if ds_file else None,
        ),
    )
    if cfg.output.report_to in ("wandb", "tensorboard"):
        log.warning(
            "%s: output.report_to is %s; raytune_qvl tracks runs in MLflow and logs there instead (set mlflow or none)",
            sources(["output", "report_to"]),
            cfg.output.report_to,
        )
    if cfg.model.trust_remote_code:
        log.warning(
            "%s: model.trust_remote_code is true: code from the model repository will run on every worker; "
            "Qwen2.5-VL does not need it",
            sources(["model", "trust_remote_code"]),
        )
    return _absolute_paths(cfg)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def _absolute_paths(cfg: Config) -> Config:
    data = cfg.data.model_copy(
        update={
            "train_path": _abs(cfg.data.train_path),
            "eval_path": _abs(cfg.data.eval_path),
            "cache_dir": _abs(cfg.data.cache_dir),
        }
    )
    model = cfg.model
    if _looks_like_path(model.name):
        model = model.model_copy(update={"name": _abs(model.name)})
    output = cfg.output.model_copy(update={"dir": _abs(cfg.output.dir), "logging_dir": _abs(cfg.output.logging_dir)})
    environment = cfg.environment.model_copy(update={"deepspeed": _abs(cfg.environment.deepspeed)})
    ray = cfg.ray
    if "://" not in ray.storage_path:
        ray = ray.model_copy(update={"storage_path": _abs(ray.storage_path)})
    return cfg.model_copy(update={"data": data, "model": model, "output": output, "environment": environment, "ray": ray})


# ----------------------------------------------------------------------------- semantic checks


def validate_config(
    sections: Mapping[str, BaseModel],
    ds_dict: Mapping[str, Any],
    source_of: _Sources,
    *,
    check_files: bool = True,
    world_size: int | None = None,
) -> list[Problem]:
    """Checks across keys and files. Each runs only if the sections it needs parsed."""
    problems: list[Problem] = []

    def add(loc: list[str], rule: str, value: Any = None, show_value: bool = True) -> None:
        problems.append(Problem(source_of(loc), ".".join(loc), rule, value, show_value))

    data: DataConfig | None = sections.get("data")  # type: ignore[assignment]
    training: TrainingConfig | None = sections.get("training")  # type: ignore[assignment]
    model: ModelConfig | None = sections.get("model")  # type: ignore[assignment]
    env: EnvironmentConfig | None = sections.get("environment")  # type: ignore[assignment]
    output: OutputConfig | None = sections.get("output")  # type: ignore[assignment]
    ray: RayConfig | None = sections.get("ray")  # type: ignore[assignment]
    evaluation: EvaluationConfig | None = sections.get("evaluation")  # type: ignore[assignment]

    if data is not None:
        if data.min_image_size > data.max_image_size:
            add(["data", "min_image_size"], f"must be <= data.max_image_size ({data.max_image_size})", data.min_image_size)
        if data.image_factor % 14:
            add(["data", "image_factor"], "must be a multiple of the 14-pixel patch (Qwen2.5-VL uses 28)", data.image_factor)
        if check_files:
            _check_file(add, ["data", "train_path"], data.train_path, "training data")
            if data.eval_path is not None:
                _check_file(add, ["data", "eval_path"], data.eval_path, "eval data")

    if training is not None:
        metric = training.metric_for_best_model
        if metric not in EVAL_METRICS:
            guess = closest(metric, list(EVAL_METRICS))
            add(
                ["training", "metric_for_best_model"],
                f"not a metric the loop reports; one of {', '.join(EVAL_METRICS)}" + (f" (did you mean {guess!r}?)" if guess else ""),
                metric,
            )
        else:
            if training.greater_is_better is not None and training.greater_is_better != (EVAL_METRICS[metric] == "max"):
                add(
                    ["training", "greater_is_better"],
                    f"contradicts {metric}, where {'higher' if EVAL_METRICS[metric] == 'max' else 'lower'} is better",
                    training.greater_is_better,
                )
            if evaluation is not None:
                rule = metric_reported(metric, evaluation)
                if rule:
                    add(["training", "metric_for_best_model"], rule, metric)
        if training.logging_steps > training.eval_steps:
            add(["training", "logging_steps"], f"must be <= training.eval_steps ({training.eval_steps})", training.logging_steps)

    if env is not None:
        if env.bf16 and env.fp16:
            add(["environment", "fp16"], "bf16 and fp16 cannot both be true; keep one", env.fp16)
        if model is not None:
            want = "bfloat16" if env.bf16 else "float16" if env.fp16 else "float32"
            if model.torch_dtype != want and not (env.bf16 and env.fp16):
                add(
                    ["model", "torch_dtype"],
                    f"must be {want} to match environment.bf16={str(env.bf16).lower()}, fp16={str(env.fp16).lower()}",
                    model.torch_dtype,
                )
        if env.deepspeed is None:
            add(["environment", "deepspeed"], "a DeepSpeed config is required: pass --deepspeed or set environment.deepspeed", None)

    if model is not None and check_files and model.name.startswith(("/", "./", "../", "~")):
        path = Path(model.name).expanduser()
        if not (path / "config.json").exists():
            add(["model", "name"], "local model folder not found or has no config.json", model.name)

    if output is not None and output.report_to not in REPORT_TO:
        add(["output", "report_to"], f"must be one of {', '.join(REPORT_TO)}", output.report_to)

    if ray is not None:
        gpus = (ray.resources_per_worker or {}).get("GPU", 0)
        if gpus and not ray.use_gpu:
            add(["ray", "resources_per_worker"], "asks for GPUs but ray.use_gpu is false", ray.resources_per_worker)
        for key, amount in (ray.resources_per_worker or {}).items():
            if amount < 0:
                add(["ray", "resources_per_worker", key], "must be >= 0", amount)

    if ds_dict and training is not None and env is not None and check_files and not problems:
        from raytune_qvl.batch_math import BatchMathError
        from raytune_qvl.deepspeed_config import check_deepspeed

        workers = world_size or (ray.num_workers if ray is not None else 1)
        try:
            for loc, rule, value in check_deepspeed(ds_dict, training, env, workers):
                problems.append(Problem(_ds_source(env, source_of), loc, rule, value))
        except BatchMathError as exc:
            problems.append(Problem(_ds_source(env, source_of), "", str(exc), show_value=False))
    return problems


def _ds_source(env: EnvironmentConfig, source_of: _Sources) -> str:
    return env.deepspeed or source_of(["environment", "deepspeed"])


def _check_file(add: Any, loc: list[str], path: str, what: str) -> None:
    p = Path(path).expanduser()
    if not p.exists():
        add(loc, f"{what} file not found", path)
    elif p.is_dir():
        add(loc, f"{what} must be a file, not a folder", path)


# ----------------------------------------------------------------------------- helpers


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept as values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def field_at(path: str) -> Any:
    """The pydantic FieldInfo of a dotted config key ("training.learning_rate"), or None."""
    model: Any = Config
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        if i == len(parts) - 1:
            return info
        model = info.annotation
    return None


def config_keys(model: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config schema (for suggestions)."""
    model = model or Config
    keys = []
    for name, info in model.model_fields.items():
        if name in ("deepspeed", "paths"):
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += config_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys
