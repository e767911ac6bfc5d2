"""Losses against values computed independently (explicit loops / closed forms), gradients
into both encoders on an unlabelled batch, CSC memory, consistency schedules."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from cmc_train.config import ModelConfig
from cmc_train.losses import cac_loss, consistency_weights, csc_loss, supervised_loss
from cmc_train.network import build_cmc


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def _dice(p: list[float], q: list[float], smooth: float = 1e-5) -> float:
    return (2 * sum(a * b for a, b in zip(p, q, strict=True)) + smooth) / (sum(p) + sum(q) + smooth)


def test_supervised_loss_by_hand() -> None:
    # one sample, K = 3 classes, 2 x 1 x 2 voxels
    logits = torch.tensor([[[[1.0, -1.0]], [[0.5, 2.0]]],
                           [[[0.0, 0.3]], [[-2.0, 1.0]]],
                           [[[0.2, 0.0]], [[1.5, -0.5]]]]).unsqueeze(0)
    labels = torch.tensor([[[0, 1]], [[2, 1]]]).unsqueeze(0)
    voxels = [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]
    probs = {v: _softmax([float(logits[0, k][v]) for k in range(3)]) for v in voxels}
    ce = sum(-math.log(probs[v][int(labels[0][v])]) for v in voxels) / len(voxels)
    dice = [_dice([probs[v][k] for v in voxels],
                  [1.0 if int(labels[0][v]) == k else 0.0 for v in voxels]) for k in range(3)]
    expected = ce + 1 - sum(dice) / 3
    assert supervised_loss(logits, labels, "sample").item() == pytest.approx(expected, rel=1e-5)
    # the MONAI-style [N, 1, D, H, W] label layout gives the same value
    assert supervised_loss(logits, labels[:, None], "sample").item() == pytest.approx(
        expected, rel=1e-5)
    with pytest.raises(ValueError, match="do not match logits"):
        supervised_loss(logits, labels[:, :1])



def test_batch_foreground_dice_by_hand() -> None:
    """One Dice per foreground class over both samples' voxels; background left out."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 1, 2, 2)
    labels = torch.tensor([[[[0, 1], [1, 1]]], [[[0, 0], [2, 0]]]])  # class 2 in sample 2 only
    probs = logits.softmax(1)
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    dice = [_dice(probs[:, k].flatten().tolist(), (labels == k).float().flatten().tolist())
            for k in (1, 2)]
    expected = ce + 1 - sum(dice) / 2
    assert supervised_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="unknown dice form"):
        supervised_loss(logits, labels, "global")

def _csc_naive(fa: torch.Tensor, fb: torch.Tensor, tau: float) -> float:
    """NT-Xent written out anchor by anchor, with Python floats."""
    total, count = 0.0, 0
    n, c = fa.shape[:2]
    for s in range(n):
        vecs = [fa[s, i].flatten().tolist() for i in range(c)]
        vecs += [fb[s, i].flatten().tolist() for i in range(c)]
        vecs = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in vecs]
        for i in range(2 * c):
            pos = (i + c) % (2 * c)
            sims = {j: sum(x * y for x, y in zip(vecs[i], vecs[j], strict=True)) / tau
                    for j in range(2 * c) if j != i}
            total += -sims[pos] + math.log(sum(math.exp(v) for v in sims.values()))
            count += 1
    return total / count


def test_csc_closed_form_and_naive_loop() -> None:
    # orthogonal channels, b equal to a: every anchor has similarity 1 to its positive and 0
    # to both negatives -> loss = log(e^2 + 2) - 2 at temperature 0.5
    fa = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # [N=1, C=2, T=2]
    assert csc_loss(fa, fa.clone()).item() == pytest.approx(math.log(math.e**2 + 2) - 2, rel=1e-6)
    # swapping b's channels pairs each channel with the wrong one: higher loss
    assert csc_loss(fa, fa.flip(1)).item() > csc_loss(fa, fa).item() + 1

    g = torch.Generator().manual_seed(0)
    fa, fb = torch.randn(2, 3, 2, 2, 1, generator=g), torch.randn(2, 3, 2, 2, 1, generator=g)
    for tau in (0.5, 0.1):
        assert csc_loss(fa, fb, tau).item() == pytest.approx(_csc_naive(fa, fb, tau), rel=1e-5)


def test_cac_by_hand() -> None:
    la = torch.tensor([[[[[2.0, 0.0, -1.0]]], [[[0.0, 1.0, 1.0]]]]])  # [1, K=2, 1, 1, 3]
    lb = torch.tensor([[[[[0.5, 0.5, 0.0]]], [[[0.0, -1.0, 2.0]]]]])
    pa = [_softmax([float(la[0, 0, 0, 0, i]), float(la[0, 1, 0, 0, i])]) for i in range(3)]
    pb = [_softmax([float(lb[0, 0, 0, 0, i]), float(lb[0, 1, 0, 0, i])]) for i in range(3)]
    dice = [_dice([p[k] for p in pa], [p[k] for p in pb]) for k in range(2)]
    assert cac_loss(la, lb).item() == pytest.approx(1 - sum(dice) / 2, rel=1e-6)
    assert cac_loss(la, lb).item() == pytest.approx(cac_loss(lb, la).item(), rel=1e-6)


def test_csc_and_cac_train_both_encoders_on_unlabelled_batch() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                      neck_channels=16, adapter_dim=4, decoder_channels=4, num_classes=3)
    net = build_cmc(cfg).train()
    a, b = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16)
    for loss_fn in (lambda o: csc_loss(o.features_a, o.features_b),
                    lambda o: cac_loss(o.logits_a, o.logits_b)):
        net.zero_grad()
        loss_fn(net(a, b)).backward()
        for encoder in (net.encoder_a, net.encoder_b):
            grad = encoder.patch_embed.proj.weight.grad
            assert grad is not None and grad.abs().sum() > 0
            assert encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


CSC_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from cmc_train.losses import csc_loss
    torch.set_num_threads(1)
    n, c, g = (int(v) for v in sys.argv[1:4])
    fa = torch.randn(n, c, g, g, g, requires_grad=True)
    fb = torch.randn(n, c, g, g, g, requires_grad=True)
    csc_loss(fa[:, :4, :2, :2, :2], fb[:, :4, :2, :2, :2]).backward()  # load kernels first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    csc_loss(fa, fb).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert fa.grad.abs().sum() > 0 and fb.grad.abs().sum() > 0
    print((after - before) * 1024)
""")


@pytest.mark.parametrize(("channels", "grid"), [(384, 8), (512, 16)])
def test_csc_peak_memory_stays_small(channels: int, grid: int) -> None:
    """Peak resident memory growth of CSC forward + backward in a fresh process (ru_maxrss
    high-water mark after the inputs exist), batch 2. An [2C, 2C, T] broadcast would need
    2 * (2C)^2 * T * 4 bytes: 2.25 GiB at 384 x 8^3, 32 GiB at 512 x 16^3."""
    n = 2
    result = subprocess.run([sys.executable, "-c", CSC_MEMORY_SCRIPT, str(n), str(channels),
                             str(grid)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    extra = int(result.stdout.split()[-1])
    assert extra < 2**30, f"CSC used {extra / 2**20:.0f} MiB extra"
    assert n * (2 * channels) ** 2 * grid**3 * 4 > 2**30  # the bug this test guards


def test_authors_schedule() -> None:
    assert consistency_weights(0, 1000, "authors") == (0.0, 0.0)
    assert consistency_weights(699, 1000, "authors") == (0.0, 0.0)
    csc, cac = consistency_weights(700, 1000, "authors")
    assert csc == pytest.approx(math.exp(-5 * 0.3**2))
    assert cac == pytest.approx((math.cos(0.7 * math.pi) + 1) / 2)
    assert consistency_weights(850, 1000, "authors") == pytest.approx(
        (math.exp(-5 * 0.15**2), (math.cos(0.85 * math.pi) + 1) / 2))
    assert consistency_weights(1000, 1000, "authors") == pytest.approx((1.0, 0.0))


def test_sigmoid_schedule() -> None:
    for step in (0, 100, 200, 399):
        expected = math.exp(-5 * (1 - step / 400) ** 2)
        assert consistency_weights(step, 1000, "sigmoid") == pytest.approx((expected, expected))
    assert consistency_weights(400, 1000, "sigmoid") == (1.0, 1.0)
    assert consistency_weights(900, 1000, "sigmoid") == (1.0, 1.0)
    assert consistency_weights(50, 100, "sigmoid", rampup_fraction=1.0) == pytest.approx(
        (math.exp(-1.25), math.exp(-1.25)))
    with pytest.raises(ValueError, match="unknown consistency schedule 'linear'"):
        consistency_weights(1, 10, "linear")
