"""The CMC network: two SAM-Med3D-style encoders, MIA channel attention, a shared fusion
layer added back to each branch, and one UNETR-style decoder per modality.

Skips (docs/METHOD.md, 'Network', item 2) generalise UNETR to any ViT patch p = 2^L: the
hidden states of L-1 evenly spaced blocks are up-projected with transposed convolutions to
1/2^(L-1) .. 1/2 of the input (shallower blocks to finer levels, as in UNETR), and a conv
stem sees the raw image at full resolution. The decoder starts from the fused bottleneck Z^m at 1/p and doubles the
resolution L times, concatenating the matching skip each time. For p = 16 this is exactly
UNETR's 1/8, 1/4, 1/2 + stem layout.

Only InstanceNorm (per-sample statistics, the same in training and inference) is used after
the encoder; nothing here keeps batch statistics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from cmc_common.contract import MODES, Mode
from cmc_train.config import ModelConfig
from cmc_train.errors import ConfigError
from cmc_train.network.vit3d import ImageEncoderViT3D


class CMCOutput(NamedTuple):
    """Training outputs: per-modality logits [N, K, S, S, S] and neck features F^m
    [N, c, g, g, g] (what the CSC loss aligns)."""

    logits_a: torch.Tensor
    logits_b: torch.Tensor
    features_a: torch.Tensor
    features_b: torch.Tensor


class ConvNormAct(nn.Sequential):
    """3x3x3 conv -> InstanceNorm (affine) -> LeakyReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01),
        )


class ConvBlock(nn.Sequential):
    """Two ConvNormAct layers (the U-Net stage used by stem, decoder and fusion)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(ConvNormAct(cin, cout), ConvNormAct(cout, cout))


class UpProject(nn.Sequential):
    """UNETR skip projection: `steps` x (2x transposed conv -> ConvNormAct)."""

    def __init__(self, cin: int, cout: int, steps: int) -> None:
        layers: list[nn.Module] = []
        for i in range(steps):
            layers += [nn.ConvTranspose3d(cin if i == 0 else cout, cout, kernel_size=2, stride=2,
                                          bias=False),
                       ConvNormAct(cout, cout)]
        super().__init__(*layers)


class MIA(nn.Module):
    """Modality-independent awareness: channel attention (DANet CAM).

    X = F as [N, C, T]; E = X X^T; A = softmax(rowmax(E) - E); out = gamma * (A X) + X,
    with gamma a learnable scalar starting at 0, so the module starts as the identity.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        x = f.flatten(2)
        energy = x @ x.transpose(1, 2)
        attn = torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)
        return self.gamma * (attn @ x).reshape(f.shape) + f


class Fusion(nn.Module):
    """G = two conv-norm-act blocks on concat(MIA^a, MIA^b), back to C channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(ConvNormAct(2 * channels, channels),
                                   ConvNormAct(channels, channels))

    def forward(self, m_a: torch.Tensor, m_b: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([m_a, m_b], dim=1))


class UNETRDecoder(nn.Module):
    """One modality's skips and decoder: stem + up-projected hidden states, upsampling path
    from Z^m, 1x1 head to K classes.

    Level k (k = 0..L-1) lives at 1/2^k of the input with f * 2^k channels; level 0 is the
    conv stem on the image, level k >= 1 the hidden state of the k-th skip block projected
    up by L-k transposed convolutions.
    """

    def __init__(self, levels: int, embed_dim: int, neck_channels: int, features: int,
                 num_classes: int) -> None:
        super().__init__()
        chans = [features * 2**k for k in range(levels)]
        self.stem = ConvBlock(1, chans[0])
        self.skips = nn.ModuleList(UpProject(embed_dim, chans[k], levels - k)
                                   for k in range(1, levels))
        coarser = [*chans[1:], neck_channels]  # channels arriving at level k from below
        self.ups = nn.ModuleList(nn.ConvTranspose3d(coarser[k], chans[k], kernel_size=2,
                                                    stride=2, bias=False)
                                 for k in range(levels))
        self.blocks = nn.ModuleList(ConvBlock(2 * chans[k], chans[k]) for k in range(levels))
        self.head = nn.Conv3d(chans[0], num_classes, kernel_size=1)

    def forward(self, image: torch.Tensor, hidden: list[torch.Tensor],
                z: torch.Tensor) -> torch.Tensor:
        """image [N,1,S,S,S], hidden: L-1 channels-last token grids, z [N,c,g,g,g] -> logits."""
        skips = [self.stem(image)] + [proj(h.permute(0, 4, 1, 2, 3))
                                      for proj, h in zip(self.skips, hidden, strict=True)]
        x = z
        for k in reversed(range(len(self.blocks))):
            x = self.blocks[k](torch.cat([self.ups[k](x), skips[k]], dim=1))
        return self.head(x)


class _Encoded(NamedTuple):
    """Both branches up to the fused bottleneck."""

    z_a: torch.Tensor
    z_b: torch.Tensor
    hidden_a: list[torch.Tensor]
    hidden_b: list[torch.Tensor]
    features_a: torch.Tensor
    features_b: torch.Tensor


def patch_levels(vit_patch: int) -> int:
    """L with vit_patch = 2^L; the decoder doubles the resolution L times."""
    levels = vit_patch.bit_length() - 1
    if vit_patch < 2 or 2**levels != vit_patch:
        raise ConfigError(f"vit_patch must be a power of two >= 2, got {vit_patch}")
    return levels


def skip_block_indices(depth: int, levels: int) -> tuple[int, ...]:
    """Blocks feeding the L-1 skips, evenly spaced: after block depth*k/L (k = 1..L-1).

    For depth 12, p = 16 this gives blocks 3, 6, 9 (1-based), UNETR's choice.
    """
    if depth < levels:
        raise ConfigError(f"depth {depth} is too shallow for {levels - 1} skip levels "
                          f"(needs depth >= {levels})")
    return tuple(round(depth * k / levels) - 1 for k in range(1, levels))


class CMCNet(nn.Module):
    """Two-branch CMC network (docs/METHOD.md, 'Network'); build it with `build_cmc`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        levels = patch_levels(cfg.vit_patch)
        skip_blocks = skip_block_indices(cfg.depth, levels)
        self.encoder_a = self._encoder(cfg, skip_blocks)
        self.encoder_b = self._encoder(cfg, skip_blocks)
        self.mia_a = MIA()
        self.mia_b = MIA()
        self.fusion = Fusion(cfg.neck_channels)
        self.decoder_a = self._decoder(cfg, levels)
        self.decoder_b = self._decoder(cfg, levels)

    @staticmethod
    def _encoder(cfg: ModelConfig, skip_blocks: tuple[int, ...]) -> ImageEncoderViT3D:
        return ImageEncoderViT3D(
            img_size=cfg.img_size, patch=cfg.vit_patch, embed_dim=cfg.embed_dim,
            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            window_size=cfg.window_size, global_attn_indexes=cfg.global_attn_indexes,
            neck_channels=cfg.neck_channels, adapter_dim=cfg.adapter_dim,
            adapter_scale=cfg.adapter_scale, skip_blocks=skip_blocks)

    @staticmethod
    def _decoder(cfg: ModelConfig, levels: int) -> UNETRDecoder:
        return UNETRDecoder(levels, cfg.embed_dim, cfg.neck_channels, cfg.decoder_channels,
                            cfg.num_classes)

    def _check(self, image: torch.Tensor, name: str) -> None:
        """Shape check in eager mode (skipped while tracing, where shapes are symbolic)."""
        if torch.jit.is_tracing():
            return
        s = self.cfg.img_size
        if image.dim() != 5 or tuple(image.shape[1:]) != (1, s, s, s):
            raise ValueError(f"{name} must be [N, 1, {s}, {s}, {s}], got {list(image.shape)}")

    def _encode(self, image_a: torch.Tensor, image_b: torch.Tensor) -> _Encoded:
        self._check(image_a, "image_a")
        self._check(image_b, "image_b")
        f_a, hidden_a = self.encoder_a(image_a)
        f_b, hidden_b = self.encoder_b(image_b)
        m_a, m_b = self.mia_a(f_a), self.mia_b(f_b)
        g = self.fusion(m_a, m_b)
        return _Encoded(m_a + g, m_b + g, hidden_a, hidden_b, f_a, f_b)

    def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> CMCOutput:
        """Both branches: logits [N, K, S, S, S] and neck features F^a, F^b."""
        enc = self._encode(image_a, image_b)
        return CMCOutput(self.decoder_a(image_a, enc.hidden_a, enc.z_a),
                         self.decoder_b(image_b, enc.hidden_b, enc.z_b),
                         enc.features_a, enc.features_b)

    def predict(self, image_a: torch.Tensor | None, image_b: torch.Tensor | None,
                mode: str) -> torch.Tensor:
        """Class probabilities [N, K, S, S, S].

        fused: mean of the two branches' softmaxes (both images on one voxel grid);
        "a" / "b": that modality's image is fed to both branches (the authors' protocol) and
        its own branch's softmax is returned; the other image may be None.
        """
        if mode not in MODES:
            raise ValueError(f"unknown predict mode {mode!r}; choose one of {MODES}")
        if mode == Mode.FUSED:
            if image_a is None or image_b is None:
                raise ValueError("fused prediction needs both image_a and image_b")
            out = self.forward(image_a, image_b)
            return 0.5 * (class_softmax(out.logits_a) + class_softmax(out.logits_b))
        image = image_a if mode == Mode.A else image_b
        if image is None:
            raise ValueError(f"prediction mode {mode!r} needs image_{mode}")
        enc = self._encode(image, image)
        if mode == Mode.A:
            return class_softmax(self.decoder_a(image, enc.hidden_a, enc.z_a))
        return class_softmax(self.decoder_b(image, enc.hidden_b, enc.z_b))


def class_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis (1), written out as max / exp / sum / divide.

    Same values as `logits.softmax(dim=1)` (to float32 rounding), but the exported graphs
    then carry ReduceMax, Exp, ReduceSum and Div instead of a Softmax on a non-last axis,
    which ONNX Runtime's CPU kernel runs about 10x slower (BENCHMARKS.md); the prediction
    head is every tile's last and largest activation.
    """
    exp = (logits - logits.amax(dim=1, keepdim=True)).exp()
    return exp / exp.sum(dim=1, keepdim=True)


def build_cmc(cfg: ModelConfig) -> CMCNet:
    """The CMC network for a model configuration (random initialisation, all trainable)."""
    return CMCNet(cfg)
