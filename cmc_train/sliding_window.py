"""Whole-volume prediction with a torch CMCNet: MONAI sliding window, gaussian blending.

Used by validation during training and by `cmc evaluate`. Patches are the network's cubic
input size; overlap 0.5 and gaussian weights (MONAI's sigma = 0.125 * patch) match what the
serving engine does with exported graphs, so torch and exported Dice are comparable.
Volumes smaller than a patch are padded by MONAI and cropped back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from cmc_common.contract import MODES, Mode

if TYPE_CHECKING:
    from cmc_train.network import CMCNet


def predict_probs(
    net: CMCNet,
    image_a: np.ndarray | torch.Tensor | None,
    image_b: np.ndarray | torch.Tensor | None,
    mode: str,
    patch_size: int,
    device: torch.device | None = None,
    sw_batch_size: int = 4,
    overlap: float = 0.5,
) -> torch.Tensor:
    """Softmax probabilities [K, D, H, W] (float32, on CPU) for a whole pre-processed volume.

    mode "fused" needs both images on one voxel grid; "a" / "b" use only that image.
    """
    if mode not in MODES:
        raise ValueError(f"unknown prediction mode {mode!r}; choose one of {MODES}")
    device = device or next(net.parameters()).device
    if mode == Mode.FUSED:
        if image_a is None or image_b is None:
            raise ValueError("fused prediction needs both images")
        if tuple(image_a.shape) != tuple(image_b.shape):
            raise ValueError(
                f"fused prediction needs one voxel grid; got shapes {tuple(image_a.shape)} "
                f"and {tuple(image_b.shape)}"
            )
        channels = [image_a, image_b]
    else:
        image = image_a if mode == Mode.A else image_b
        if image is None:
            raise ValueError(f"mode {mode!r} needs image_{mode}")
        channels = [image]
    volume = torch.stack([torch.as_tensor(np.asarray(c), dtype=torch.float32) for c in channels])
    if volume.ndim != 4:
        raise ValueError(f"expected 3-D volumes, got shape {tuple(volume.shape[1:])}")

    def predictor(patches: torch.Tensor) -> torch.Tensor:
        if mode == Mode.FUSED:
            return net.predict(patches[:, 0:1], patches[:, 1:2], Mode.FUSED)
        if mode == Mode.A:
            return net.predict(patches, None, Mode.A)
        return net.predict(None, patches, Mode.B)

    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            probs = sliding_window_inference(
                volume[None],
                roi_size=(patch_size,) * 3,
                sw_batch_size=sw_batch_size,
                predictor=predictor,
                overlap=overlap,
                mode="gaussian",
                sw_device=device,
                device=torch.device("cpu"),
            )
    finally:
        net.train(was_training)
    assert isinstance(probs, torch.Tensor)
    return probs[0].float()


def predict_labels(
    net: CMCNet,
    image_a: np.ndarray | torch.Tensor | None,
    image_b: np.ndarray | torch.Tensor | None,
    mode: str,
    patch_size: int,
    device: torch.device | None = None,
) -> np.ndarray:
    """Arg-max label volume (uint8, [D, H, W]) of `predict_probs`."""
    probs = predict_probs(net, image_a, image_b, mode, patch_size, device)
    return probs.argmax(dim=0).to(torch.uint8).numpy()
