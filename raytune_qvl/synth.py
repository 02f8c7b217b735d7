"""`python -m raytune_qvl.synth OUT_DIR`: synthetic OCR data (raytune_qvl/assets/synth.py)."""

from raytune_qvl.assets.synth import main

if __name__ == "__main__":
    main()
