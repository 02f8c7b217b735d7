"""`python -m raytune_qvl.ui`: the MLflow UI on the project's tracking store (raytune_qvl/track/ui.py)."""

from raytune_qvl.track.ui import main

if __name__ == "__main__":
    main()
