"""Training: one run of DeepSpeed LoRA workers, from the driver down to the loop.

cli.py          python -m raytune_qvl.train            run.py        one run's driver (MLflow, progress)
preflight.py    processor, data audit, plan            outputs.py    the output folder and its rules
trainer.py      the Ray Train TorchTrainer             worker.py     the Ray Train worker
session.py      what the loop works with (setup)       loop.py       the training loop (runs without Ray)
model.py        Qwen2.5-VL by model_type               lora.py       which modules get LoRA
engine.py       DeepSpeed engine, process group        checkpoint.py checkpoints and exact resume
evaluate.py     generation eval inside the loop        metrics.py    CER, WER, NED, ANLS
faults.py       fault injection at named steps, for the fault suite
ops.py          DeepSpeed's compiled ops: needed, prebuilt or buildable here
"""
