"""python -m raytune_qvl.train: one training run (see cli.py)."""

from raytune_qvl.train.cli import main

main()
