"""Fixtures shared by several test modules.

The helpers that build test data stay in modules of their own (`segment_fixtures`: the
threshold model and phantoms; `export_fixtures`: a micro checkpoint; `dicom_factory`: DICOM
series; `triton_fixture`: a local tritonserver), imported by the tests that need them; the
fixtures more than one module uses live here. A module defines its own `model_dir` where it
needs another model (pytest's fixture overriding).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import segment_fixtures as fx

# triton_install, tiny_model_dir, triton_server: a real tritonserver (tests marked triton);
# slurm_cluster: a real single-node Slurm (munged, slurmctld, slurmd); conv3_model_dir,
# pointwise_dir, images: the engine tests' patch models and images.
pytest_plugins = ["triton_fixture", "slurm_fixture", "engine_fixtures"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The threshold model of `segment_fixtures` (modes fused, a, b; ONNX fp32), one per
    test module."""
    return fx.make_model_dir(tmp_path_factory.mktemp("model"))
