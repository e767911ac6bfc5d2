"""The engine (ONNX Runtime, fp32) against MONAI sliding_window_inference on the real CMC net.

What is compared: the tiny CMC network (`model_config("tiny", 5)`, random init, seeded),
its fused predict graph exported here with torch.onnx.export (opset 17, dynamic batch) and
run by `Segmenter`, versus `monai.inferers.sliding_window_inference(mode="gaussian",
sigma_scale=0.125, overlap=0.5, roi_size=32^3)` on the eager PyTorch model.

MONAI places tiles on a fixed stride and clamps the last one to the border (starts
0, 16, 32, 45 on 77 voxels); the engine spreads them evenly nnU-Net style (0, 15, 30, 45).
The gaussian weights are the same up to scale (checked first). On a 64x61x45 volume the
two placements coincide along D (0, 16, 32) and W (0, 13), overlaps included, and differ
along H (MONAI 0, 16, 29; engine 0, 14, 29). Probabilities must agree within 1e-4, and the
argmax exactly, on every voxel whose set of covering tiles is the same in both placements
(44% of the volume, including voxels blended from up to 4 tiles).
Whole-volume argmax agreement is not asserted: it measures how much the network's output
depends on where a voxel sits in its tile, not the engine. For this random-init network
it is low (77% measured on 77x93x61, while the coinciding voxels there agreed to 5e-7), so
a 99.9% gate needs a trained model. The volume is smaller than 77x93x61 to keep the cost
in the test budget (18 instead of 60 tiles per side).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
network = pytest.importorskip("cmc_train.network")

from monai.data.utils import compute_importance_map, dense_patch_slices  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402

from cmc_serve.engine import Segmenter  # noqa: E402
from cmc_serve.model_json import ModelJson, graph_entry, write_model_json  # noqa: E402
from cmc_serve.tiling import axis_starts, gaussian_importance  # noqa: E402
from cmc_train.config import model_config  # noqa: E402

ROI = 32
K = 5


class FusedGraph(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
        return self.net.predict(image_a, image_b, "fused")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    net = network.build_cmc(model_config("tiny", K)).eval()
    root = tmp_path_factory.mktemp("cmc_tiny")
    (root / "onnx").mkdir()
    x = torch.randn(2, 1, ROI, ROI, ROI)
    with torch.no_grad():
        torch.onnx.export(FusedGraph(net), (x, x), str(root / "onnx/fused_fp32.onnx"),
                          input_names=["image_a", "image_b"], output_names=["probs"],
                          dynamic_axes={n: {0: "batch"} for n in ("image_a", "image_b", "probs")},
                          opset_version=17, dynamo=False)
    write_model_json(root, ModelJson(
        name="tiny", cmc_version="0.1.0", modalities=["ct", "mr"],
        classes=[f"c{i}" for i in range(K)], patch_size=[ROI] * 3, max_batch=4,
        preprocessing={},
        graphs=[graph_entry("fused", "onnxruntime", "fp32", "onnx/fused_fp32.onnx")]))
    return net, root


def monai_probs(net: torch.nn.Module, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.stack([a, b])[None])
    with torch.no_grad():
        out = sliding_window_inference(
            x, roi_size=(ROI,) * 3, sw_batch_size=4, overlap=0.5, mode="gaussian",
            sigma_scale=0.125, predictor=lambda t: net.predict(t[:, :1], t[:, 1:], "fused"))
    return out[0].numpy()


def engine_probs(model_dir: Path, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with Segmenter(model_dir, runtime="onnxruntime", return_probs=True) as seg:
        result = seg.segment(a, b, mode="fused")
    assert result.probs is not None
    return result.probs


def coinciding(shape: tuple[int, ...]) -> np.ndarray:
    """Voxels whose covering tiles are the same in MONAI's and the engine's placement."""
    slices = dense_patch_slices(shape, (ROI,) * 3, (ROI // 2,) * 3)
    masks = []
    for axis, size in enumerate(shape):
        monai_starts = sorted({s[axis].start for s in slices})
        ours = axis_starts(size, ROI, 0.5)
        cover_m = [frozenset(s for s in monai_starts if s <= v < s + ROI) for v in range(size)]
        cover_o = [frozenset(s for s in ours if s <= v < s + ROI) for v in range(size)]
        masks.append(np.array([m == o for m, o in zip(cover_m, cover_o, strict=True)]))
    return masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]


def volume(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # smooth-ish structure so the network's output varies over the volume
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = np.exp(-4 * (zz**2 + yy**2 + xx**2))
    a = (blob + 0.3 * rng.normal(size=shape)).astype(np.float32)
    b = (np.sin(3 * zz) * blob + 0.3 * rng.normal(size=shape)).astype(np.float32)
    return a, b


def test_gaussian_weights_match_monai_up_to_scale() -> None:
    for patch in ((32, 32, 32), (24, 17, 8)):
        ref = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125).numpy()
        np.testing.assert_allclose(gaussian_importance(patch), ref / ref.max(), rtol=1e-5,
                                   atol=1e-7)


@pytest.mark.slow
def test_engine_matches_monai_sliding_window(exported: tuple[torch.nn.Module, Path]) -> None:
    net, model_dir = exported
    a, b = volume((64, 61, 45), seed=2)
    ours, ref = engine_probs(model_dir, a, b), monai_probs(net, a, b)
    mask = coinciding(a.shape)
    assert 0.4 < mask.mean() < 0.5  # both kinds of voxels are present
    np.testing.assert_allclose(ours[:, mask], ref[:, mask], atol=1e-4)
    np.testing.assert_array_equal(ours.argmax(0)[mask], ref.argmax(0)[mask])
    # elsewhere both are still proper probability maps of the same network
    np.testing.assert_allclose(ours.sum(0), 1.0, atol=1e-5)
