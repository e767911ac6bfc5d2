"""Helpers every cmc package may import (stdlib only): training, export and serving alike.

Kept apart because `cmc_train` and `cmc_serve` must not import each other (docs/DESIGN.md),
yet both write files that must behave the same way (`files.atomic_write`).
"""
