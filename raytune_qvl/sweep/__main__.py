"""python -m raytune_qvl.sweep SEARCH_SPACE: a sweep (see cli.py)."""

from raytune_qvl.sweep.cli import main

main()
