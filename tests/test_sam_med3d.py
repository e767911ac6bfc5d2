"""SAM-Med3D checkpoint loading: the real ViT-B (vit_b_ori) layout loads strictly into both
encoders and freezes the right parameters; any mismatch fails loudly with the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from cmc_train.config import ModelConfig, model_config
from cmc_train.network import CMCNet, SamMed3DError, build_cmc, load_sam_med3d_encoder


def vit_b_ori_encoder_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of SAM-Med3D's `image_encoder` for `vit_b_ori`, written out from its
    build_sam3D.py / image_encoder3D.py: img 128, patch 16, d 768, depth 12, 12 heads,
    MLP 3072, global attention in blocks 2, 5, 8, 11 (rel_pos over 2*8-1 = 15 positions),
    window 14 elsewhere (2*14-1 = 27), neck 768 -> 384."""
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (768, 1, 16, 16, 16),
        "patch_embed.proj.bias": (768,),
        "pos_embed": (1, 8, 8, 8, 768),
        "neck.0.weight": (384, 768, 1, 1, 1),
        "neck.1.weight": (384,), "neck.1.bias": (384,),
        "neck.2.weight": (384, 384, 3, 3, 3),
        "neck.3.weight": (384,), "neck.3.bias": (384,),
    }
    for i in range(12):
        rel = 15 if i in (2, 5, 8, 11) else 27
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (768,), b + "norm1.bias": (768,),
            b + "attn.qkv.weight": (2304, 768), b + "attn.qkv.bias": (2304,),
            b + "attn.proj.weight": (768, 768), b + "attn.proj.bias": (768,),
            b + "attn.rel_pos_d": (rel, 64), b + "attn.rel_pos_h": (rel, 64),
            b + "attn.rel_pos_w": (rel, 64),
            b + "norm2.weight": (768,), b + "norm2.bias": (768,),
            b + "mlp.lin1.weight": (3072, 768), b + "mlp.lin1.bias": (3072,),
            b + "mlp.lin2.weight": (768, 3072), b + "mlp.lin2.bias": (768,),
        })
    return shapes


def _save(path: Path, encoder: dict[str, torch.Tensor], extra: dict | None = None) -> Path:
    state = {f"image_encoder.{k}": v for k, v in encoder.items()}
    # parts of SAM that CMC does not use; the loader must skip them
    state["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 384)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 384)
    torch.save({"epoch": 3, "model_state_dict": state, **(extra or {})}, path)
    return path


def _is_frozen_by_method(name: str) -> bool:
    return name.startswith(("patch_embed.", "pos_embed")) or ".attn." in name


def _check_loaded(net: CMCNet, expected: dict[str, torch.Tensor]) -> None:
    for encoder in (net.encoder_a, net.encoder_b):
        state = encoder.state_dict()
        for key, value in expected.items():
            assert torch.equal(state[key], value), key
        for name, param in encoder.named_parameters():
            assert param.requires_grad == (not _is_frozen_by_method(name)), name
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert all(n.startswith(("encoder_a.", "encoder_b.")) for n in frozen)
    last = f"encoder_b.blocks.{net.cfg.depth - 1}."
    for name in ("encoder_a.blocks.0.adapter.down.weight", last + "mlp.lin1.weight",
                 "encoder_a.neck.2.weight", last + "norm1.weight", last + "adapter.up.bias",
                 "mia_a.gamma", "fusion.block.0.0.weight", "decoder_b.head.weight"):
        assert dict(net.named_parameters())[name].requires_grad, name


def test_loads_real_vit_b_layout_into_both_encoders(tmp_path: Path) -> None:
    shapes = vit_b_ori_encoder_shapes()
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    # SAM-Med3D's training script stores its argparse namespace beside the weights
    path = _save(tmp_path / "sam_med3d.pth", weights, {"args": argparse.Namespace(lr=1e-4)})
    net = build_cmc(model_config("sam-med3d", 5))
    assert all(p.requires_grad for p in net.parameters())  # random init trains everything
    assert load_sam_med3d_encoder(net, path) == len(shapes)
    _check_loaded(net, weights)


@pytest.fixture
def micro_net() -> CMCNet:
    cfg = ModelConfig(img_size=16, vit_patch=4, embed_dim=32, depth=2, num_heads=2,
                      window_size=3, global_attn_indexes=(1,), neck_channels=16, adapter_dim=4,
                      decoder_channels=4, num_classes=3)
    return build_cmc(cfg)


def _micro_weights(net: CMCNet) -> dict[str, torch.Tensor]:
    return {k: torch.randn_like(v) for k, v in build_cmc(net.cfg).encoder_a.state_dict().items()
            if ".adapter." not in k}


def test_loads_and_freezes_at_small_size(micro_net: CMCNet, tmp_path: Path) -> None:
    weights = _micro_weights(micro_net)
    load_sam_med3d_encoder(micro_net, _save(tmp_path / "ok.pth", weights))
    _check_loaded(micro_net, weights)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda w: w.pop("blocks.1.attn.rel_pos_h"), r"missing: blocks\.1\.attn\.rel_pos_h"),
    (lambda w: w.update({"blocks.0.attn.rel_pos_d": torch.zeros(11, 16)}),
     r"shape mismatch: blocks\.0\.attn\.rel_pos_d \(file \[11, 16\], network \[5, 16\]\)"),
    (lambda w: w.update({"blocks.2.norm1.weight": torch.zeros(32)}),
     r"unexpected: blocks\.2\.norm1\.weight"),
])
def test_mismatched_encoder_fails_naming_the_key(micro_net: CMCNet, tmp_path: Path, mutate,
                                                 message: str) -> None:
    weights = _micro_weights(micro_net)
    mutate(weights)
    before = {k: v.clone() for k, v in micro_net.state_dict().items()}
    with pytest.raises(SamMed3DError, match=r"bad\.pth: image encoder does not fit.*" + message):
        load_sam_med3d_encoder(micro_net, _save(tmp_path / "bad.pth", weights))
    # nothing was loaded or frozen
    assert all(torch.equal(before[k], v) for k, v in micro_net.state_dict().items())
    assert all(p.requires_grad for p in micro_net.parameters())


def test_wrong_file_structure_fails(micro_net: CMCNet, tmp_path: Path) -> None:
    bare = tmp_path / "bare.pth"
    torch.save({f"image_encoder.{k}": v for k, v in _micro_weights(micro_net).items()}, bare)
    with pytest.raises(SamMed3DError, match=r"bare\.pth: not a SAM-Med3D checkpoint .*"
                                            r"'model_state_dict'"):
        load_sam_med3d_encoder(micro_net, bare)

    no_encoder = tmp_path / "no_encoder.pth"
    torch.save({"model_state_dict": {"mask_decoder.x": torch.zeros(1)}}, no_encoder)
    with pytest.raises(SamMed3DError, match=r"no_encoder\.pth: .*no 'image_encoder\.\*'"):
        load_sam_med3d_encoder(micro_net, no_encoder)

    foreign = tmp_path / "foreign.pth"
    _save(foreign, {**_micro_weights(micro_net)})
    data = torch.load(foreign)
    data["model_state_dict"]["module.image_encoder.pos_embed"] = torch.zeros(1)
    torch.save(data, foreign)
    with pytest.raises(SamMed3DError, match=r"unexpected keys .*module\.image_encoder\.pos_embed"):
        load_sam_med3d_encoder(micro_net, foreign)

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(SamMed3DError, match=r"notes\.txt: not a torch checkpoint file"):
        load_sam_med3d_encoder(micro_net, text)

    with pytest.raises(SamMed3DError, match=r"missing\.pth: cannot read"):
        load_sam_med3d_encoder(micro_net, tmp_path / "missing.pth")


class _Opaque:
    """A pickled object the safe loader must refuse."""


def test_unsafe_pickle_is_refused_unless_trusted(micro_net: CMCNet, tmp_path: Path) -> None:
    weights = _micro_weights(micro_net)
    path = _save(tmp_path / "opaque.pth", weights, {"extra": _Opaque()})
    with pytest.raises(SamMed3DError, match=r"opaque\.pth: refused to load \(it holds a "
                                            r"\S*_Opaque object\).*trusted=True"):
        load_sam_med3d_encoder(micro_net, path)
    load_sam_med3d_encoder(micro_net, path, trusted=True)
    _check_loaded(micro_net, weights)
