"""Data: the datalist, MONAI pre-processing and augmentation, step-indexed semi-supervised
sampling, and importers for public dataset layouts.

Only the datalist is imported here; `transforms` and `loaders` pull in torch and MONAI.
"""

from cmc_train.data.datalist import Datalist, DatalistError, Entry

__all__ = ["Datalist", "DatalistError", "Entry"]
