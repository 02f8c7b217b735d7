"""The sweep: stages in priority order, each a Ray Tune search of Ray Train trials.

cli.py      python -m raytune_qvl.sweep           run.py      the sweep, top to bottom
space.py    the search-space schema, stages       load.py     reading and checking a file, its overrides
points.py   a sampled point -> a trial's config   plan.py     concurrency and the --dry-run text
context.py  what the sweep's steps share          stage.py    one stage's Tuner and its records
search.py   TPE / random + ASHA, no point twice   trial.py    one Tune trial = one TorchTrainer
records.py  trial records and ranking             state.py    the resumable state file
outputs.py  best/, pruning, the top table
"""
