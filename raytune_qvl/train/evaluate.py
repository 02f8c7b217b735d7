"""Generation-based evaluation inside the loop: greedy decoding of the assistant answer on a
fixed, seeded eval subset, shared across workers and combined over all of them."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from raytune_qvl.config.schema import Config
from raytune_qvl.train.engine import WorkerContext
from raytune_qvl.train.metrics import corpus_scores, sample_error
from raytune_qvl.train.outputs import PREDICTIONS_FILE

__all__ = ["is_better", "GenerationEval", "max_new_tokens_for"]

log = logging.getLogger("raytune_qvl")
GENERATION_MARGIN = 8  # tokens beyond the longest reference when evaluation.max_new_tokens is null


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    if not math.isfinite(value):  # a NaN would otherwise become a best no value can beat
        return False
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def max_new_tokens_for(items: Sequence[Any]) -> int:
    """Enough new tokens for the longest reference answer (its tokens and end of turn) plus a
    margin, so that a correct answer is never cut."""
    longest = max((sum(1 for label in item.labels if label != -100) for item in items), default=0)
    return longest + GENERATION_MARGIN


@dataclass
class GenerationEval:
    items: list[Any]  # the fixed subset of encoded eval samples
    indices: list[int]  # their positions in the eval file
    processor: Any
    task: str
    ctx: WorkerContext
    max_new_tokens: int
    batch_size: int
    synced: bool  # ZeRO-3 over several workers: every rank decodes until all are done
    last_predictions: list[dict[str, Any]] | None = None
    last_step: int | None = None  # the optimizer step of last_predictions
    _warned_truncation: bool = False

    @classmethod
    def create(cls, cfg: Config, eval_split: Any, processor: Any, ctx: WorkerContext) -> "GenerationEval | None":
        from raytune_qvl.config.deepspeed import zero_stage

        k = min(cfg.evaluation.generation_samples, len(eval_split.items))
        if k == 0:
            return None
        # the same subset at every evaluation, in every trial of a sweep (seeded, not by step)
        indices = sorted(random.Random(cfg.environment.seed).sample(range(len(eval_split.items)), k))
        task = cfg.evaluation.task if cfg.evaluation.task != "auto" else eval_split.audit.task
        items = [eval_split.items[i] for i in indices]
        return cls(
            items=items,
            indices=indices,
            processor=processor,
            task=task,
            ctx=ctx,
            max_new_tokens=cfg.evaluation.max_new_tokens or max_new_tokens_for(items),
            batch_size=cfg.training.per_device_eval_batch_size,
            synced=zero_stage(cfg.deepspeed) == 3 and ctx.world_size > 1,
        )

    def _batch(self, chunk: Sequence[Any], device: Any) -> dict[str, Any]:
        """Left-padded prompts (everything before the answer) with their images and modalities,
        as the processor would give them for these prompts."""
        import torch

        from raytune_qvl.data.batches import mm_token_types
        from raytune_qvl.data.images import load_image

        pad = self.processor.tokenizer.pad_token_id
        prompts = [item.input_ids[: item.prompt_len] for item in chunk]
        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), longest), dtype=torch.long)
        modality = torch.zeros((len(chunk), longest), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, longest - len(prompt) :] = torch.tensor(prompt)
            attention[i, longest - len(prompt) :] = 1
            modality[i, longest - len(prompt) :] = mm_token_types(self.processor, prompt)
        batch: dict[str, Any] = {
            "input_ids": input_ids.to(device),
            "attention_mask": attention.to(device),
            "mm_token_type_ids": modality.to(device),
        }
        images = [load_image(p) for item in chunk for p in item.images]
        if images:
            pixels = self.processor.image_processor(images=images, return_tensors="pt")
            batch["pixel_values"] = pixels["pixel_values"].to(device)
            batch["image_grid_thw"] = pixels["image_grid_thw"].to(device)
        return batch

    def predict(self, model: Any, device: Any) -> list[tuple[int, str, bool]]:
        """Greedy decoding with the KV cache of this worker's share of the subset, in batches:
        (position in the subset, answer, truncated at max_new_tokens) per sample. Every worker
        makes the same number of generate calls (ZeRO-3 gathers parameters collectively)."""
        import torch

        mine = list(range(self.ctx.rank, len(self.items), self.ctx.world_size))
        per_worker = math.ceil(len(self.items) / self.ctx.world_size)
        padded = mine + [mine[0] if mine else 0] * (per_worker - len(mine))  # same call count everywhere
        tokenizer = self.processor.tokenizer
        eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        eos = [e for e in eos if isinstance(e, int) and e >= 0] or [tokenizer.eos_token_id]
        results: list[tuple[int, str, bool]] = []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, per_worker, self.batch_size):
                chunk_ids = padded[start : start + self.batch_size]
                batch = self._batch([self.items[i] for i in chunk_ids], device)
                out = model.generate(
                    **batch,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                    synced_gpus=self.synced,
                )
                new_tokens = out[:, batch["input_ids"].shape[1] :]
                ended = torch.isin(new_tokens, torch.tensor(eos, device=new_tokens.device)).any(dim=1)
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for offset, text in enumerate(texts):
                    if start + offset < len(mine):
                        results.append((chunk_ids[offset], text.strip(), not bool(ended[offset])))
        model.train(was_training)
        return results

    def run(self, engine: Any, step: int) -> dict[str, float]:
        """Decode this worker's share, gather every worker's predictions, score them. Answers cut
        at max_new_tokens are counted (eval_truncated), never silently scored as complete."""
        import torch.distributed as dist

        started = time.perf_counter()
        results = self.predict(engine.module, engine.device)
        gathered: list[Any] = [results]
        if dist.is_initialized() and self.ctx.world_size > 1:
            gathered = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, results)
        predictions = sorted((row for part in gathered for row in part), key=lambda p: p[0])
        self.last_step = step
        self.last_predictions = [
            {
                "index": self.indices[i],
                "id": self.items[i].id,
                "image": self.items[i].images[0] if self.items[i].images else None,
                "reference": self.items[i].answer,
                "prediction": text,
                "error": sample_error(self.task, self.items[i].answer, text),
                "truncated": truncated,
            }
            for i, text, truncated in predictions
        ]
        truncated = sum(1 for p in self.last_predictions if p["truncated"])
        if truncated and self.ctx.is_main and not self._warned_truncation:
            self._warned_truncation = True
            log.warning(
                "%d of %d generated answers hit evaluation.max_new_tokens (%d) and were cut; "
                "raise it (or set it to null: the longest reference plus a margin)",
                truncated,
                len(self.last_predictions),
                self.max_new_tokens,
            )
        scores = corpus_scores(self.task, ((p["reference"], p["prediction"]) for p in self.last_predictions))
        return scores | {"eval_truncated": truncated, "eval_generation_seconds": time.perf_counter() - started}

    def write_predictions(self, folder: Path) -> None:
        if self.last_predictions is not None:
            (folder / PREDICTIONS_FILE).write_text(
                json.dumps(
                    {"task": self.task, "step": self.last_step, "rows": self.last_predictions},
                    ensure_ascii=False,
                    indent=1,
                )
            )
