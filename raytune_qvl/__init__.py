"""raytune_qvl: Ray-based distributed tuning of Qwen2.5-VL LoRA fine-tuning."""

__version__ = "0.1.0"
