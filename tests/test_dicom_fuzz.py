"""Fuzz the scanner and the loader: mutated headers and bytes give our errors or a valid volume,
never a stray exception from pydicom/numpy."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import SeriesSpec, write_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmc_serve.dicom import DicomError, load_series, scan_folder

TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
        "PixelData", "SeriesInstanceUID", "BitsAllocated", "BitsStored", "SamplesPerPixel",
        "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "PhotometricInterpretation",
        "Modality", "ImageType", "SOPClassUID", "SeriesNumber", "StudyInstanceUID"]


@pytest.fixture(scope="module")
def series_bytes() -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_series(Path(tmp), SeriesSpec(n_slices=4, rows=6, cols=5), shuffle=False)
        return [p.read_bytes() for p in paths]


delete_tag = st.tuples(st.just("delete"), st.sampled_from(TAGS), st.none())
garble_tag = st.tuples(st.just("garble"), st.sampled_from(TAGS), st.binary(max_size=24))
number_tag = st.tuples(st.just("number"), st.sampled_from(TAGS),
                       st.sampled_from([b"0", b"-1", b"nan", b"1e308\\inf", b"3", b"65535",
                                        b"1\\0\\0\\1\\0\\0", b"", b"\x00\x00"]))
overwrite = st.tuples(st.just("bytes"), st.integers(0, 4000), st.binary(min_size=1, max_size=64))
truncate = st.tuples(st.just("truncate"), st.integers(0, 4000), st.none())
mutation = st.one_of(delete_tag, garble_tag, number_tag, overwrite, truncate)


def mutate(data: bytes, kind: str, where, value) -> bytes:
    if kind == "bytes":
        at = where % max(len(data), 1)
        return data[:at] + value + data[at + len(value):]
    if kind == "truncate":
        return data[: where % max(len(data), 1)]
    try:
        return _mutate_header(data, kind, where, value)
    except Exception:  # an earlier byte mutation left nothing pydicom can edit: keep it as is
        return data


def _mutate_header(data: bytes, kind: str, keyword: str, value: bytes | None) -> bytes:
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    if keyword not in ds:
        return data
    if kind == "delete":
        delattr(ds, keyword)
        out = pydicom.filebase.DicomBytesIO()
        ds.save_as(out)
        return out.getvalue()
    # overwrite the encoded value in place (length field kept): a value of the wrong kind
    raw = ds.get_item(keyword)
    at, n = raw.value_tell, raw.length
    return data[:at] + value.ljust(n, b" ")[:n] + data[at + n:]


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(st.integers(0, 3), mutation), min_size=1, max_size=3))
def test_mutated_series_give_clean_errors(series_bytes: list[bytes], mutations: list) -> None:
    files = list(series_bytes)
    for index, (kind, where, value) in mutations:
        files[index] = mutate(files[index], kind, where, value)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, data in enumerate(files):
            (Path(tmp) / f"f{i}.dcm").write_bytes(data)
        try:
            result = scan_folder(tmp)
        except DicomError:
            return
        for series in result.series:
            try:
                loaded = load_series(series)
            except DicomError:
                continue
            vol = loaded.volume
            assert vol.array.ndim == 3 and vol.array.shape[2] == len(loaded.datasets) >= 2
            assert np.all(np.isfinite(vol.affine))
