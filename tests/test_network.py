"""CMC network: shapes for the presets, inference modes, MIA, SAM-Med3D attention arithmetic,
windowed attention with padding, generalised UNETR skips, ONNX export."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmc_train.config import ModelConfig, model_config
from cmc_train.network import CMCNet, build_cmc
from cmc_train.network.cmc_net import MIA, class_softmax, patch_levels, skip_block_indices
from cmc_train.network.vit3d import Attention, Block3D, window_partition, window_unpartition


def _perturb(net: torch.nn.Module) -> None:
    """Move the zero-initialised parts (MIA gamma, adapters' up-projection, relative
    positions) off zero so that the checks exercise them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.3)
            elif "adapter.up" in name or "rel_pos" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


# grid 4 with window 3: block 0 pads to 6^3 (8 windows), block 1 is global
MICRO = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                    window_size=3, global_attn_indexes=(1,), neck_channels=16, adapter_dim=4,
                    decoder_channels=4, num_classes=3)


@pytest.fixture(scope="module")
def micro() -> CMCNet:
    """The tiny preset's code path at a size that keeps repeated forwards cheap."""
    torch.manual_seed(0)
    net = build_cmc(MICRO).eval()
    _perturb(net)
    return net


def test_tiny_preset_forward_shapes() -> None:
    net = build_cmc(model_config("tiny", 5)).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 32, 32, 32), torch.randn(1, 1, 32, 32, 32))
    assert out.logits_a.shape == out.logits_b.shape == (1, 5, 32, 32, 32)
    assert out.features_a.shape == out.features_b.shape == (1, 64, 8, 8, 8)


def test_predict_modes(micro: CMCNet) -> None:
    a, b = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        out = micro(a, b)
        fused = micro.predict(a, b, "fused")
        expected = (out.logits_a.softmax(1) + out.logits_b.softmax(1)) / 2
        torch.testing.assert_close(fused, expected)
        torch.testing.assert_close(fused.sum(1), torch.ones(2, 16, 16, 16))

        # single modality: the one image goes to both branches
        only_a = micro.predict(a, None, "a")
        torch.testing.assert_close(only_a, micro(a, a).logits_a.softmax(1))
        assert not torch.allclose(only_a, out.logits_a.softmax(1))
        only_b = micro.predict(None, b, "b")
        torch.testing.assert_close(only_b, micro(b, b).logits_b.softmax(1))


def test_predict_and_forward_reject_bad_input(micro: CMCNet) -> None:
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="unknown predict mode 'ct'"):
        micro.predict(x, x, "ct")
    with pytest.raises(ValueError, match="needs image_b"):
        micro.predict(x, None, "b")
    with pytest.raises(ValueError, match="fused prediction needs both"):
        micro.predict(x, None, "fused")
    with pytest.raises(ValueError, match=r"image_b must be \[N, 1, 16, 16, 16\]"):
        micro(x, torch.randn(1, 1, 8, 16, 16))


def test_eval_output_does_not_depend_on_batch_companions(micro: CMCNet) -> None:
    """No batch statistics anywhere: a sample's prediction is the same alone or batched."""
    a, b = torch.randn(3, 1, 16, 16, 16), torch.randn(3, 1, 16, 16, 16)
    with torch.no_grad():
        batched = micro.predict(a, b, "fused")
        alone = micro.predict(a[1:2], b[1:2], "fused")
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in micro.modules())


def test_small_preset_forward_shapes() -> None:
    cfg = model_config("small", 4)
    net = build_cmc(cfg).eval()
    assert [b.window for b in net.encoder_a.blocks] == [4, 4, 0, 4, 4, 0]
    with torch.no_grad():
        out = net(torch.randn(1, 1, 64, 64, 64), torch.randn(1, 1, 64, 64, 64))
    assert out.logits_a.shape == out.logits_b.shape == (1, 4, 64, 64, 64)
    assert out.features_a.shape == (1, 128, 8, 8, 8)


def test_unetr_skip_scheme_for_patch_16() -> None:
    """p = 16 (SAM-Med3D): skips from blocks 3, 6, 9 at 1/8, 1/4, 1/2 + stem, as in UNETR."""
    assert patch_levels(16) == 4 and patch_levels(4) == 2
    assert skip_block_indices(12, 4) == (2, 5, 8)
    assert skip_block_indices(4, 2) == (1,)
    with pytest.raises(ValueError, match="power of two"):
        patch_levels(12)
    cfg = ModelConfig(img_size=32, vit_patch=16, embed_dim=32, depth=4, num_heads=2,
                      neck_channels=16, adapter_dim=4, decoder_channels=4, num_classes=3)
    net = build_cmc(cfg).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        _, hidden = net.encoder_a(x)
        skips = [proj(h.permute(0, 4, 1, 2, 3)) for proj, h in zip(net.decoder_a.skips, hidden, strict=True)]
        assert [tuple(s.shape) for s in skips] == [(1, 8, 16, 16, 16), (1, 16, 8, 8, 8),
                                                  (1, 32, 4, 4, 4)]
        assert net(x, x).logits_a.shape == (1, 3, 32, 32, 32)


def test_mia_identity_at_gamma_zero_and_formula() -> None:
    mia = MIA()
    f = torch.randn(2, 3, 2, 2, 2)
    torch.testing.assert_close(mia(f), f)

    with torch.no_grad():
        mia.gamma.fill_(0.7)
    x = f.reshape(2, 3, 8).double()
    expected = torch.empty_like(x)
    for n, i in itertools.product(range(2), range(3)):
        energy = [float(x[n, i] @ x[n, j]) for j in range(3)]
        logits = torch.tensor([max(energy) - e for e in energy], dtype=torch.float64)
        weights = logits.softmax(0)
        expected[n, i] = 0.7 * sum(weights[j] * x[n, j] for j in range(3)) + x[n, i]
    torch.testing.assert_close(mia(f).double(), expected.reshape(f.shape), atol=1e-5, rtol=1e-5)


def test_attention_relative_positions_match_sam_med3d_arithmetic() -> None:
    """Explicit loop over query/key pairs of the bias SAM-Med3D's `add_decomposed_rel_pos`
    adds (its `rel_d[:, :, :, :, None, None]`-style broadcasting, see Attention._logits):
    (qd,qh,qw)->(kd,kh,kw) gets q(qd,qh,qw).Rd[qd-kw] + q(qd,qh,kd).Rh[qh-kw]
    + q(qd,qh,kh).Rw[kh-kw] (offsets + s - 1)."""
    torch.manual_seed(0)
    s, dim, heads = 3, 8, 2
    attn = Attention(dim, heads, s)
    with torch.no_grad():
        for p in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w):
            p.normal_()
    x = torch.randn(1, s, s, s, dim)
    q, k, v = attn.qkv(x).reshape(s, s, s, 3, heads, dim // heads).unbind(3)
    scale = (dim // heads) ** -0.5
    out = torch.zeros(s, s, s, heads, dim // heads)
    cube = list(itertools.product(range(s), repeat=3))
    for n in range(heads):
        for qd, qh, qw in cube:
            logits = []
            for kd, kh, kw in cube:
                value = scale * q[qd, qh, qw, n] @ k[kd, kh, kw, n]
                value = value + q[qd, qh, qw, n] @ attn.rel_pos_d[qd - kw + s - 1]
                value = value + q[qd, qh, kd, n] @ attn.rel_pos_h[qh - kw + s - 1]
                value = value + q[qd, qh, kh, n] @ attn.rel_pos_w[kh - kw + s - 1]
                logits.append(value)
            weights = torch.stack(logits).softmax(0)
            out[qd, qh, qw, n] = sum(w * v[kd, kh, kw, n] for w, (kd, kh, kw) in zip(weights, cube, strict=True))
    expected = attn.proj(out.reshape(1, s, s, s, dim))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_window_partition_roundtrip_with_padding() -> None:
    x = torch.randn(2, 6, 6, 6, 5)
    windows = window_partition(x, grid=6, window=4)
    assert windows.shape == (2 * 8, 4, 4, 4, 5)
    torch.testing.assert_close(window_unpartition(windows, grid=6, window=4), x)
    # the padded corner of the last window is zero, the first window is x[:, :4, :4, :4]
    torch.testing.assert_close(windows[0], x[0, :4, :4, :4])
    assert windows[7, 2:, 2:, 2:].abs().sum() == 0


def test_windowed_block_equals_per_window_attention_on_zero_padded_grid() -> None:
    """Grid 6, window 4: the grid is zero-padded (after norm1) to 8 and each 4^3 cube attends
    within itself, padded tokens included as keys (SAM-Med3D's behaviour)."""
    torch.manual_seed(0)
    block = Block3D(dim=16, num_heads=2, mlp_ratio=2.0, grid=6, window=4, adapter_dim=4,
                    adapter_scale=0.5)
    _perturb(block)
    x = torch.randn(2, 6, 6, 6, 16)
    padded = F.pad(block.norm1(x), (0, 0, 0, 2, 0, 2, 0, 2))
    attended = torch.zeros_like(padded)
    for i, j, k in itertools.product(range(2), repeat=3):
        sl = (slice(None), slice(4 * i, 4 * i + 4), slice(4 * j, 4 * j + 4),
              slice(4 * k, 4 * k + 4))
        attended[sl] = block.attn(padded[sl])
    h = x + attended[:, :6, :6, :6]
    h = h + block.mlp(block.norm2(h))
    expected = h + 0.5 * block.adapter(h)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_windowed_config_with_uneven_grid_runs_end_to_end() -> None:
    cfg = ModelConfig(img_size=24, vit_patch=4, embed_dim=32, depth=3, num_heads=2,
                      window_size=4, global_attn_indexes=(1,), neck_channels=16,
                      adapter_dim=4, decoder_channels=4, num_classes=3)
    net = build_cmc(cfg)
    out = net(torch.randn(1, 1, 24, 24, 24), torch.randn(1, 1, 24, 24, 24))
    assert out.logits_a.shape == (1, 3, 24, 24, 24) and out.features_b.shape == (1, 16, 6, 6, 6)
    (out.logits_a.mean() + out.logits_b.mean()).backward()
    assert net.encoder_a.blocks[0].attn.qkv.weight.grad is not None


def test_onnx_export_dynamic_batch_matches_torch(micro: CMCNet, tmp_path) -> None:
    """Legacy exporter, opset 17, dynamic batch; onnxruntime agrees with torch at batch 2."""
    ort = pytest.importorskip("onnxruntime")

    class Fused(torch.nn.Module):
        def __init__(self, net: CMCNet) -> None:
            super().__init__()
            self.net = net

        def forward(self, image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
            return self.net.predict(image_a, image_b, "fused")

    path = tmp_path / "fused.onnx"
    example = (torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16))
    torch.onnx.export(Fused(micro), example, str(path), dynamo=False, opset_version=17,
                      input_names=["image_a", "image_b"], output_names=["probs"],
                      dynamic_axes={"image_a": {0: "N"}, "image_b": {0: "N"}, "probs": {0: "N"}})
    a, b = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image_a": a.numpy(), "image_b": b.numpy()})[0]
    with torch.no_grad():
        expected = micro.predict(a, b, "fused").numpy()
    assert got.shape == (2, 3, 16, 16, 16)
    assert np.abs(got - expected).max() < 1e-4


def test_class_softmax_equals_softmax_and_survives_large_logits() -> None:
    logits = torch.randn(2, 5, 3, 4, 4) * 30.0
    logits[0, 2] += 1e4  # exp would overflow without the max subtraction
    probs = class_softmax(logits)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs, logits.softmax(dim=1), rtol=1e-6, atol=1e-6)
