"""Test helpers for `cmc segment`: a small real model directory and phantom images.

The model is a real ONNX patch graph (1x1x1 convolution + softmax with large weights), so the
whole serving path (runtime, tiling, pre-processing, resampling, writing) runs for real while
the correct answer stays known: after pre-processing,
  class 1 ("bright_a") where the modality-a image is above 0.5 (CT window: above ~37 HU),
  class 2 ("bright_b") where the modality-b image is above 0 (z-score: brighter than mean).
The fused graph sees both channels, so swapping a and b changes the answer: a pipeline that
silently feeds the channels in the wrong order fails the tests. Like an exported CMC graph it
also returns each decoder's softmax (`probs_a`, `probs_b`); here both decoders give the
fused answer (they agree everywhere), so `probs` is their mean exactly as DESIGN.md says.
`make_model_dir(branch_outputs=False)` writes a fused graph exported before those outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import onnx
import pydicom.data
from dicom_factory import ROOT_UID, SeriesSpec, make_dataset
from onnx import TensorProto, helper, numpy_helper
from pydicom.uid import MRImageStorage, generate_uid

from cmc_common.contract import MODES

CLASSES = ["background", "bright_a", "bright_b"]
PATCH = 16
SCALE = 40.0  # logit slope: softmax is effectively one-hot away from the thresholds
THRESHOLD_A = 0.5
THRESHOLD_B = 0.0
SPACING = (2.0, 2.0, 2.0)

# Intensities of the phantoms (before pre-processing).
CT_BACKGROUND, CT_OBJECT = -1000.0, 200.0
MR_BACKGROUND, MR_OBJECT = 10.0, 100.0


def _conv_weights(mode: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """1x1x1 conv weights [K, C, 1, 1, 1] and bias [K] giving the logits described above."""
    k = len(CLASSES)
    if mode == "fused":
        inputs = ["image_a", "image_b"]
        w = np.zeros((k, 2), np.float32)
        b = np.zeros(k, np.float32)
        w[1, 0], b[1] = SCALE, -SCALE * THRESHOLD_A
        w[2, 1], b[2] = SCALE, -SCALE * THRESHOLD_B + 1.0  # b wins where both are bright
    else:
        inputs = ["image_a"] if mode == "a" else ["image_b"]
        w = np.zeros((k, 1), np.float32)
        b = np.full(k, -1000.0, np.float32)
        b[0] = 0.0
        cls, thr = (1, THRESHOLD_A) if mode == "a" else (2, THRESHOLD_B)
        w[cls, 0], b[cls] = SCALE, -SCALE * thr
    return w.reshape(k, len(inputs), 1, 1, 1), b, inputs


def patch_graph(mode: str, branch_outputs: bool = True) -> onnx.ModelProto:
    """The ONNX patch graph for one inference mode (DESIGN.md "Graph I/O"); the fused graph
    with `branch_outputs` also returns `probs_a` and `probs_b`."""
    w, b, inputs = _conv_weights(mode)
    spatial = [PATCH, PATCH, PATCH]
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1, *spatial])
                    for n in inputs]
    nodes = []
    x = inputs[0]
    if len(inputs) == 2:
        nodes.append(helper.make_node("Concat", inputs, ["x"], axis=1))
        x = "x"
    nodes.append(helper.make_node("Conv", [x, "w", "b"], ["logits"]))
    outputs = ["probs"]
    if mode == "fused" and branch_outputs:
        outputs += ["probs_a", "probs_b"]
        nodes += [helper.make_node("Softmax", ["logits"], ["probs_a"], axis=1),
                  helper.make_node("Identity", ["probs_a"], ["probs_b"]),
                  helper.make_node("Add", ["probs_a", "probs_b"], ["both"]),
                  helper.make_node("Mul", ["both", "half"], ["probs"])]
    else:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", len(CLASSES), *spatial])
            for n in outputs]
    graph = helper.make_graph(nodes, f"cmc_test_{mode}", graph_inputs, outs,
                              initializer=[numpy_helper.from_array(w, "w"),
                                           numpy_helper.from_array(b, "b"),
                                           numpy_helper.from_array(np.array(0.5, np.float32),
                                                                   "half")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_model_dir(root: Path, modes: tuple[str, ...] = MODES,
                   format_version: int = 1, checksums: bool = True,
                   postprocessing: dict[str, Any] | None = None,
                   branch_outputs: bool = True,
                   qc_reference: dict[str, Any] | None = None) -> Path:
    """Write MODEL_DIR (cmc.json + onnx/<mode>_fp32.onnx) for the threshold model; with
    `checksums` each graph entry records its file's size and sha256 as `cmc export` does
    (False: a cmc.json of an export made before checksums existed); `postprocessing` as
    `cmc evaluate --choose-postprocessing` records it; `branch_outputs` False: a fused graph
    exported before the branch outputs; `qc_reference` as `cmc export` carries it from the
    checkpoint (`cmc_train.qc_reference`)."""
    from cmc_serve.model_json import ModelJson, graph_entry, write_model_json

    (root / "onnx").mkdir(parents=True, exist_ok=True)
    graphs = []
    for mode in modes:
        rel = f"onnx/{mode}_fp32.onnx"
        onnx.save(patch_graph(mode, branch_outputs), str(root / rel))
        graphs.append(graph_entry(mode, "onnxruntime", "fp32", rel))
    write_model_json(root, ModelJson(
        name="cmc-test", cmc_version="0.1.0", modalities=["ct", "mr"], classes=CLASSES,
        patch_size=[PATCH] * 3, max_batch=4,
        preprocessing={"modalities": ["ct", "mr"], "spacing": list(SPACING),
                       "orientation": "RAS",
                       "normalisation": {"ct": {"kind": "ct_window", "low": -175.0,
                                                "high": 250.0},
                                         "mr": {"kind": "zscore_nonzero"}}},
        checkpoint_sha256="0" * 64, graphs=graphs, format_version=format_version,
        postprocessing=postprocessing, qc_reference=qc_reference), checksums=checksums)
    return root


# ---------------------------------------------------------------- phantoms in world space

def world_grid(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """RAS world coordinates [..., 3] of every voxel centre of a grid."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def ball(world: np.ndarray, centre: tuple[float, float, float], radius: float) -> np.ndarray:
    return np.linalg.norm(world - np.asarray(centre), axis=-1) <= radius


# Two objects in world space (mm): a ball bright in CT (class 1), a ball bright in MR (class 2).
BALL_A = ((-8.0, 4.0, 0.0), 9.0)
BALL_B = ((10.0, -6.0, 4.0), 7.0)


def phantom(shape: tuple[int, int, int], affine: np.ndarray, modality: str) -> np.ndarray:
    """Image of the two-ball phantom on a grid; CT shows ball A bright, MR shows ball B."""
    world = world_grid(shape, affine)
    if modality == "ct":
        img = np.full(shape, CT_BACKGROUND, np.float32)
        img[ball(world, *BALL_A)] = CT_OBJECT
    else:
        img = np.full(shape, MR_BACKGROUND, np.float32)
        img[ball(world, *BALL_B)] = MR_OBJECT
    return img


def expected_labels(shape: tuple[int, int, int], affine: np.ndarray,
                    mode: str = "fused") -> np.ndarray:
    """The labels the threshold model must give on a grid, by mode."""
    world = world_grid(shape, affine)
    out = np.zeros(shape, np.uint8)
    if mode in ("fused", "a"):
        out[ball(world, *BALL_A)] = 1
    if mode in ("fused", "b"):
        out[ball(world, *BALL_B)] = 2
    return out


def ras_affine(spacing: tuple[float, float, float], shape: tuple[int, int, int]) -> np.ndarray:
    """A RAS affine with the grid centred on the world origin."""
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    return aff


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(path))
    return path


def dice(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(bool), y.astype(bool)
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else float(2 * (x & y).sum() / total)


# ---------------------------------------------------------------- DICOM phantoms

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DICOMDIRTESTS = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"


def dicom_affine(spec: SeriesSpec) -> np.ndarray:
    """RAS voxel -> world affine of a series as cmc_serve reads it: array[column, row, slice]."""
    o = np.asarray(spec.orientation, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = o[:3] * spec.pixel_spacing[1]
    lps[:3, 1] = o[3:] * spec.pixel_spacing[0]
    lps[:3, 2] = spec.normal() * spec.slice_spacing
    lps[:3, 3] = spec.origin
    return LPS_TO_RAS @ lps


def write_phantom_series(folder: Path, spec: SeriesSpec) -> list[Path]:
    """A DICOM series of the two-ball phantom (CT in HU, or MR) with `spec`'s geometry.

    MR series get the MR Image Storage SOP class and no rescale; pixel values are exact.
    """
    shape = (spec.cols, spec.rows, spec.n_slices)
    modality = "ct" if spec.modality == "CT" else "mr"
    image = phantom(shape, dicom_affine(spec), modality)  # [column, row, slice]
    stored = (image - spec.intercept) / spec.slope
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, position in enumerate(spec.positions()):
        ds = make_dataset(spec, k, position, np.round(stored[:, :, k].T).astype(np.int32))
        if spec.modality == "MR":
            ds.SOPClassUID = MRImageStorage
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            del ds.RescaleType, ds.KVP
        path = folder / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ct_spec(study_uid: str, **overrides: object) -> SeriesSpec:
    """An axial CT at the model's 2 mm spacing covering both balls."""
    base = dict(rows=20, cols=22, n_slices=12, pixel_spacing=(2.0, 2.0), slice_spacing=2.0,
                origin=(-21.0, -19.0, -11.0), modality="CT", description="abdomen venous",
                series_number=3, study_uid=study_uid, series_uid=generate_uid(ROOT_UID))
    base.update(overrides)
    return SeriesSpec(**base)  # type: ignore[arg-type]


def mr_spec(study_uid: str, **overrides: object) -> SeriesSpec:
    """A coronal MR on another grid (1.5 mm in-plane, 2.5 mm slices) of the same frame."""
    base = dict(rows=18, cols=24, n_slices=14, pixel_spacing=(1.75, 1.5), slice_spacing=2.5,
                orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0), origin=(-18.0, -16.0, 15.0),
                modality="MR", description="t1 coronal", series_number=5, intercept=0.0,
                image_type=("ORIGINAL", "PRIMARY", "M"), study_uid=study_uid,
                series_uid=generate_uid(ROOT_UID))
    base.update(overrides)
    return SeriesSpec(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------- running the command

def run_cli(*args: object) -> Any:
    """Run `cmc ARGS` in-process; returns typer's Result (exit_code, stderr, ...)."""
    from cmc_cli.main import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


def segment(*args: object) -> Any:
    """Run `cmc segment ARGS` in-process; returns typer's Result (exit_code, stderr, ...)."""
    return run_cli("segment", *args)


def read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def case_files(out: Path) -> list[str]:
    """Every file under OUT, relative, sorted (to assert exactly what a run left)."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def assert_ball_b(labels: np.ndarray, affine: np.ndarray) -> None:
    """Class 2 (from the MR, resampled into another grid) is ball B in world space.

    Linear interpolation blurs the ball's edge and the model thresholds at the z-score mean,
    so the label is the ball dilated by up to a voxel: it must contain the whole ball and be
    centred on it (a flip or shift moves it by centimetres).
    """
    truth = expected_labels(labels.shape, affine, "b") == 2  # type: ignore[arg-type]
    got = labels == 2
    assert got[truth].all(), "part of ball B is missing"
    assert dice(got, truth) >= 0.7
    centre = np.argwhere(got).mean(axis=0)
    world = affine[:3, :3] @ centre + affine[:3, 3]
    assert np.linalg.norm(world - np.asarray(BALL_B[0])) < 1.0, world
