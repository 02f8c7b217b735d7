"""The data pipeline: records -> chat -> processor -> masked labels -> batches, with a pre-flight
audit and a prepared cache. Bad records are skipped, counted and reported, never a crash.

    records.py    reading the three record schemas      images.py    decoding, aspect limit, patch grid
    processor.py  the Qwen2.5-VL processor              encode.py    token ids and label masks
    audit.py      the pre-flight pass over a file       cache.py     prepared once, reused by every worker
    batches.py    dataset, collator, epoch sampler      cli.py       python -m raytune_qvl.data PATH
    table.py      the cache's memory-mapped Arrow rows
"""
