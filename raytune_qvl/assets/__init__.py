"""The embedded tiny default, built locally: synthetic OCR data (synth.py) and a tiny Qwen2.5-VL
with its tokenizer and the real processor (tiny.py)."""
