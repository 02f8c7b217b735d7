"""`python -m raytune_qvl.tiny OUT_DIR`: the tiny Qwen2.5-VL (raytune_qvl/assets/tiny.py)."""

from raytune_qvl.assets.tiny import main

if __name__ == "__main__":
    main()
