"""bench/qc.py's parts: the failure set (`cases`) and its scoring (`scoring`)."""
