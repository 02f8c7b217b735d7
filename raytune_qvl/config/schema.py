"""The configuration schema: the seed's training YAML and LoRA YAML as typed sections, plus the
DeepSpeed JSON as written, in one `Config`. Defaults live here, each beside its field.

Pure: pydantic only. Loading, overrides and cross-field validation are in `load.py` and
`validate.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Config",
    "ConfigPaths",
    "ModelConfig",
    "PreprocessingConfig",
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
    "REPORT_TO",
    "TRAINING_SECTIONS",
    "SECTIONS",
    "metric_mode",
    "test_metric",
    "metric_reported",
    "field_at",
    "config_keys",
]

# Every metric the loop reports at evaluation, with the direction that is better.
EVAL_METRICS: dict[str, Literal["min", "max"]] = {
    "eval_loss": "min",
    "eval_cer": "min",  # character error rate (documents)
    "eval_wer": "min",  # word error rate (documents)
    "eval_ned": "min",  # normalized edit distance after LaTeX normalization (formulas)
    "eval_anls": "max",  # average normalized Levenshtein similarity (visual QA)
    "eval_exact_match": "max",
}


def test_metric(metric: str) -> str:
    """The held-out test split's name for an eval metric: eval_cer -> test_cer."""
    return "test_" + metric.removeprefix("eval_")


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


class Section(BaseModel):
    # strict: a string is never silently turned into a number or a bool; unknown keys are errors
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# ----------------------------------------------------------------------------- training YAML


class ModelConfig(Section):
    name: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # hub id or local checkpoint folder
    revision: str = "main"
    torch_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: Literal["flash_attention_2", "sdpa", "eager"] = "flash_attention_2"
    trust_remote_code: bool = False  # Qwen2.5-VL is native in transformers: no remote code needed


class PreprocessingConfig(Section):
    shuffle: bool = True  # shuffle the training order every epoch
    seed: int = 42  # data-order seed


class DataConfig(Section):
    train_path: str = "./data/train.jsonl"
    eval_path: str | None = "./data/eval.jsonl"
    test_path: str | None = None  # held out: read only at a run's last step (a sweep: its final report)
    max_length: int = Field(2048, ge=32)  # tokens; longer samples are dropped, never cut
    max_image_size: int = Field(1280, ge=28)  # long side in px of a square image: max_pixels = size**2
    min_image_size: int = Field(256, ge=28)  # likewise: min_pixels = size**2
    image_factor: int = Field(28, ge=1)  # patch_size * spatial_merge_size of the vision tower
    num_workers: int = Field(4, ge=0)  # DataLoader processes per Ray worker
    # a micro-batch's samples packed into as few rows of <= max_length tokens as fit, each with its
    # own M-RoPE positions and attention (off until measured better: BENCHMARKS.md section 7)
    packing: bool = False
    group_by_length: bool = False  # each optimizer step's samples sorted by length into its micro-batches
    preprocessing: PreprocessingConfig = PreprocessingConfig()
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)  # more bad records than this: stop before training
    allow_outside_paths: bool = False  # image paths may escape the data file's folder
    cache_dir: str | None = None  # processed-data cache; default ~/.cache/raytune_qvl/data
    system_prompt: str | None = None  # None: the chat template's default system prompt


class TrainingConfig(Section):
    finetuning_type: Literal["lora", "full"] = "lora"  # full: every weight trains, no LoRA (lr ~1e-5..5e-5)
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
    # the last step's checkpoint: the engine state (optimizer, scheduler), or for LoRA the adapter only,
    # a few MB instead of GBs: a finished run is never resumed (a sweep's trials write adapter)
    final_checkpoint: Literal["engine", "adapter"] = "engine"
    metric_for_best_model: str = "eval_loss"
    greater_is_better: bool | None = None  # None: from the metric (min for losses/error rates)
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps (schedule too)
    eval_on_start: bool = False  # evaluate the untrained model at step 0
    # per-module learning rates, as multiples of learning_rate (so the batch scaling rule and a sweep's
    # learning-rate stage move every module together): the vision tower's LoRA (or weights), the merger
    # (the vision-to-language projector) and the language model (with lm_head)
    vision_lr_ratio: float = Field(1.0, gt=0.0, le=100.0)
    merger_lr_ratio: float = Field(1.0, gt=0.0, le=100.0)
    language_model_lr_ratio: float = Field(1.0, gt=0.0, le=100.0)
    train_merger: bool = False  # LoRA: the merger trains in full and is saved with the adapter
    freeze_vision_tower: bool = False  # full fine-tuning: the vision tower (not the merger) stays frozen


class OutputConfig(Section):
    dir: str = "./outputs/qwen25vl-lora-ocr"
    logging_dir: str = "./logs/qwen25vl-lora-ocr"
    report_to: str = "mlflow"  # mlflow | none (the seed's wandb/tensorboard: MLflow, with a warning)
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment_name: str = "raytune_qvl"
    run_name: str | None = None  # None: the output folder's name


class EnvironmentConfig(Section):
    seed: int = 42  # LoRA initialisation, dropout and data order
    dataloader_pin_memory: bool = True
    bf16: bool = True
    fp16: bool = False
    gradient_checkpointing: bool = True  # trade compute for activation memory
    deepspeed: str | None = "./configs/ds_config_zero2.json"  # --deepspeed wins over this


class RayConfig(Section):
    address: str | None = None  # None: RAY_ADDRESS if set, else a new local cluster; "auto": join one
    num_workers: int = Field(1, ge=1)  # Ray Train workers = DeepSpeed world size
    use_gpu: bool = False  # one GPU per worker unless resources_per_worker says otherwise
    resources_per_worker: dict[str, float] | None = None  # e.g. {CPU: 8, GPU: 1}
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    storage_path: str = "./ray_results"  # checkpoints and run state; shared storage on multi-node
    shared_storage: bool = False  # storage_path is a filesystem every node mounts (checked at start)
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint (-1: forever)


class EvaluationConfig(Section):
    task: Literal["auto", "ocr_doc", "ocr_formula", "general_vqa"] = "auto"  # auto: from the data
    generation_samples: int = Field(32, ge=0)  # fixed, seeded eval subset decoded greedily; 0: off
    generation_every: int = Field(1, ge=1)  # decode at every N-th evaluation (it costs more than loss)
    max_new_tokens: int | None = Field(128, ge=1)  # null: the longest reference answer + 8 tokens
    label_mask_samples: int = Field(3, ge=0)  # samples rendered in the label-mask view


# ----------------------------------------------------------------------------- LoRA YAML


class VisionLoraConfig(Section):
    enabled: bool = False  # LoRA on the vision tower too
    vision_target_modules: list[str] = Field(default_factory=lambda: ["qkv"], min_length=1)
    vision_r: int = Field(8, ge=1, le=256)
    vision_alpha: int = Field(16, ge=1)


class LoraConfig(Section):
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
    # variants (peft): rsLoRA scales by alpha/sqrt(r); DoRA learns a magnitude per output; PiSSA/OLoRA start
    # from the weights' principal/orthonormal parts (the base changes: adapters are converted at save into a
    # plain LoRA of twice the rank for the unchanged base); LoRA+ trains B at loraplus_lr_ratio x the rate of A
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: str = Field("default", pattern=r"^(default|gaussian|olora|pissa|pissa_niter_[0-9]+)$")
    loraplus_lr_ratio: float | None = Field(None, ge=1.0, le=1024.0)  # the LoRA+ paper's 16 is a start

    @property
    def mutates_base(self) -> bool:
        """PiSSA and OLoRA move part of each target weight into the adapter at initialisation."""
        return self.init_lora_weights.startswith(("pissa", "olora"))

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
