"""`python -m raytune_qvl.tiny OUT_DIR`: the embedded default's pre-trained tiny Qwen2.5-VL
(raytune_qvl/assets/base.py; `--random` for the untrained one of raytune_qvl/assets/tiny.py)."""

from raytune_qvl.assets.base import main

if __name__ == "__main__":
    main()
