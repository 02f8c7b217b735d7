"""python -m raytune_qvl.data PATH: the data audit (see cli.py)."""

from raytune_qvl.data.cli import main

main()
