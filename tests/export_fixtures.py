"""Shared inputs of the export tests: a micro CMC model saved as a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from cmc_train.checkpoint import build_metadata, save_checkpoint
from cmc_train.config import ModelConfig, PreprocessConfig
from cmc_train.network import build_cmc

# The smallest configuration the network accepts: every graph path, seconds to trace.
MICRO = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                    neck_channels=16, adapter_dim=8, decoder_channels=8, num_classes=5)
CLASSES = ["background", "liver", "spleen", "kidney_r", "kidney_l"]
PREPROCESS = PreprocessConfig(modalities=("ct", "mr"), spacing=(2.0, 2.0, 2.0))


def micro_net(seed: int = 0, logit_scale: float = 1.0) -> torch.nn.Module:
    """A randomly initialised micro network in eval mode.

    Random weights give near-uniform probabilities (a barely trained model); `logit_scale`
    multiplies both heads' weights and biases, which makes the outputs as confident as a
    trained network's (most voxels' top class far ahead of the second).
    """
    torch.manual_seed(seed)
    net = build_cmc(MICRO).eval()
    with torch.no_grad():
        for decoder in (net.decoder_a, net.decoder_b):
            decoder.head.weight.mul_(logit_scale)
            decoder.head.bias.mul_(logit_scale)
    return net


def write_micro_checkpoint(path: Path, seed: int = 0) -> Path:
    """save_checkpoint of a randomly initialised micro network; returns `path`."""
    metadata = build_metadata(MICRO, PREPROCESS, CLASSES, {"steps": 0, "seed": seed})
    save_checkpoint(path, micro_net(seed).state_dict(), metadata)
    return path
