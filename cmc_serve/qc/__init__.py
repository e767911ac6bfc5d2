"""Quality control of a segmentation: how far to trust one case's answer (torch-free).

`flags` holds the record every signal reports into (`QcFlag`) and the verdict a case
carries (`CaseQc`); the signal modules (branch agreement, input fingerprint, anatomy) and
the verdict that combines them live beside it.
"""
