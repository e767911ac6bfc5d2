"""CMC losses and consistency-weight schedules (docs/METHOD.md, 'Losses').

- supervised: cross-entropy + soft Dice over the softmax (labelled samples, per modality);
- CSC: channel-wise NT-Xent between the two modalities' neck features, computed with one
  (2C x 2C) similarity matrix per sample: memory O(C*T + C^2), never O(C^2 * T);
- CAC: 1 - soft Dice between the two modalities' softmax maps, mean over classes.
All three pass gradients to every input; none of them detaches a branch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cmc_train.config import DICE_FORMS, SCHEDULES

DICE_SMOOTH = 1e-5  # added to numerator and denominator (MONAI's smooth_nr / smooth_dr)


def soft_dice(p: torch.Tensor, q: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft Dice per sample and class, [N, K], of two [N, K, ...] maps:
    (2 sum(p q) + smooth) / (sum(p) + sum(q) + smooth), sums over the spatial axes."""
    dims = tuple(range(2, p.dim()))
    inter = (p * q).sum(dims)
    total = p.sum(dims) + q.sum(dims)
    return (2.0 * inter + smooth) / (total + smooth)


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor,
                    dice: str = "batch-foreground") -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice). logits [N, K, D, H, W]; labels [N, D, H, W] or
    [N, 1, D, H, W] integer class ids.

    dice "sample": Dice per sample and class, averaged over samples and all K classes
    (background included); "batch-foreground": one Dice per foreground class over the whole
    batch (nnU-Net's batch Dice without the background)."""
    if labels.dim() == logits.dim() and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != logits.dim() - 1 or labels.shape[0] != logits.shape[0] \
            or labels.shape[1:] != logits.shape[2:]:
        raise ValueError(f"labels {list(labels.shape)} do not match logits "
                         f"{list(logits.shape)} (expected [N, D, H, W])")
    labels = labels.long()
    ce = F.cross_entropy(logits.float(), labels)
    probs = logits.float().softmax(dim=1)
    one_hot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    if dice == "sample":
        return ce + (1.0 - soft_dice(probs, one_hot).mean())
    if dice == "batch-foreground":
        def whole_batch(x: torch.Tensor) -> torch.Tensor:  # [N, K, ...] -> [1, K-1, N*...]
            return x[:, 1:].transpose(0, 1).reshape(1, x.shape[1] - 1, -1)
        return ce + (1.0 - soft_dice(whole_batch(probs), whole_batch(one_hot)).mean())
    raise ValueError(f"unknown dice form {dice!r}; choose one of {DICE_FORMS}")


def csc_loss(features_a: torch.Tensor, features_b: torch.Tensor,
             temperature: float = 0.5) -> torch.Tensor:
    """Channel-wise semantic consistency: NT-Xent over the 2C channel vectors of each sample.

    Each channel map is flattened to T values and L2-normalised (z^a_c, z^b_c); the positive
    of z^a_c is z^b_c and vice versa, the other 2C-2 vectors are negatives. The similarity
    matrix is one batched [2C, T] x [T, 2C] product; the loss is the mean over samples and
    the 2C anchors. features_* [N, C, ...] (any spatial shape, same for both).
    """
    if features_a.shape != features_b.shape:
        raise ValueError(f"CSC needs equal feature shapes, got {list(features_a.shape)} and "
                         f"{list(features_b.shape)}")
    n, c = features_a.shape[:2]
    z = torch.cat([features_a.reshape(n, c, -1), features_b.reshape(n, c, -1)], dim=1)
    z = F.normalize(z.float(), dim=-1)  # [N, 2C, T]
    sim = (z @ z.transpose(1, 2)) / temperature  # [N, 2C, 2C]
    self_mask = torch.eye(2 * c, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    positive = torch.cat([torch.arange(c, 2 * c), torch.arange(0, c)]).to(sim.device)
    return F.cross_entropy(sim.reshape(n * 2 * c, 2 * c), positive.repeat(n))


def cac_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Contrastive anatomical-similar consistency: 1 - soft Dice between the two softmax maps,
    mean over classes and samples. Both maps carry gradients (no stop-gradient)."""
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"CAC needs equal logit shapes, got {list(logits_a.shape)} and "
                         f"{list(logits_b.shape)}")
    return 1.0 - soft_dice(logits_a.float().softmax(dim=1), logits_b.float().softmax(dim=1)).mean()


def sigmoid_rampup(x: float) -> float:
    """exp(-5 (1 - x)^2) for x clipped to [0, 1] (Laine & Aila's ramp-up)."""
    x = min(max(x, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - x) ** 2)


def consistency_weights(step: int, total_steps: int, schedule: str,
                        rampup_fraction: float = 0.4) -> tuple[float, float]:
    """(CSC factor, CAC factor) at `step` of `total_steps`, multiplied by the configured
    loss weights by the trainer.

    authors: both 0 before 0.7 T; then CSC exp(-5 (1 - t/T)^2), CAC (cos(pi t/T) + 1) / 2.
    sigmoid: both exp(-5 (1 - x)^2) with x = t / (rampup_fraction T), 1 after the ramp.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    frac = step / total_steps
    if schedule == "authors":
        if frac < 0.7:
            return 0.0, 0.0
        return math.exp(-5.0 * (1.0 - frac) ** 2), (math.cos(math.pi * frac) + 1.0) / 2.0
    if schedule == "sigmoid":
        if rampup_fraction <= 0:
            return 1.0, 1.0
        w = sigmoid_rampup(frac / rampup_fraction)
        return w, w
    raise ValueError(f"unknown consistency schedule {schedule!r}; choose one of {SCHEDULES}")
