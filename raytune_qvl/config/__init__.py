"""The configuration: the seed's three files as one typed, validated `Config`, and every number
derived from it. Pure (no torch, Ray, DeepSpeed, transformers, MLflow or Optuna).

    schema.py      the sections and their defaults         files.py       safe YAML 1.2 / JSON reading
    overrides.py   section.key=value                       problems.py    pydantic errors as one-line problems
    load.py        load_config: merge, validate, paths     validate.py    checks across keys and files
    batch_math.py  effective batch, accumulation, steps    deepspeed.py   "auto" filled, contradictions refused
    plan.py        a run's derived numbers (--dry-run)     uris.py        tracking URIs, passwords struck out
    write.py       configs written back as runnable files
"""
