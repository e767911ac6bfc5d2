"""3D ViT encoder laid out exactly like SAM-Med3D's `ImageEncoderViT3D`, plus CMC adapters.

Module and parameter names (`patch_embed.proj`, `pos_embed`, `blocks.N.norm1`,
`blocks.N.attn.qkv|proj|rel_pos_d|rel_pos_h|rel_pos_w`, `blocks.N.norm2`,
`blocks.N.mlp.lin1|lin2`, `neck.0..3`) and their shapes match the public SAM-Med3D
checkpoint, so its `image_encoder.*` weights load strictly (see `sam_med3d.py`). The only
extra parameters are the CMC adapters, `blocks.N.adapter.down|up`, which the checkpoint
cannot contain.

Computation matches SAM-Med3D too, so loaded weights behave as they were trained: windowed
blocks zero-pad the token grid (after `norm1`) up to a multiple of the window, and the padded
tokens take part in attention as keys, as in the original; the decomposed relative-position
terms follow SAM-Med3D's arithmetic exactly, including its broadcasting (see
`Attention._logits`).

Every reshape keeps the batch dimension symbolic (-1) and takes the spatial sizes from the
configuration, never from tensor values, so the encoder traces to ONNX with a dynamic batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # SAM-Med3D builds every LayerNorm with eps 1e-6.


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of an [N, C, D, H, W] tensor (SAM-Med3D's neck norm)."""

    def __init__(self, num_channels: int, eps: float = LN_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class PatchEmbed3D(nn.Module):
    """Non-overlapping p^3 patches -> d channels, returned channels-last [N, g, g, g, d]."""

    def __init__(self, patch: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(1, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class MLPBlock(nn.Module):
    """Transformer MLP (names `lin1`, `lin2` as in SAM-Med3D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Adapter(nn.Module):
    """CMC bottleneck adapter d -> r -> d.

    `up` starts at zero so that a freshly built adapter is the identity: loading pretrained
    SAM-Med3D weights then reproduces the pretrained encoder exactly until training moves it.
    """

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def relative_index(size: int) -> torch.Tensor:
    """[size, size] indices into a (2*size-1)-row table: entry (q, k) = q - k + size - 1.

    This is SAM-Med3D's `get_rel_pos` for equal query and key sizes (the only case it uses).
    """
    coords = torch.arange(size)
    return coords[:, None] - coords[None, :] + (size - 1)


class Attention(nn.Module):
    """Multi-head self-attention over a cube of `size`^3 tokens with decomposed relative
    position terms on D, H and W (MViTv2 / SAM), as in SAM-Med3D."""

    rel_index: torch.Tensor
    key_kw: torch.Tensor
    key_dw_hw: torch.Tensor

    def __init__(self, dim: int, num_heads: int, size: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.size = size
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # SAM initialises these at zero (rel_pos_zero_init=True).
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        # Not persistent: derived from `size`, and must not appear in the state dict (the
        # SAM-Med3D checkpoint has no such key).
        self.register_buffer("rel_index", relative_index(size), persistent=False)
        key_kw, key_dw_hw = key_one_hots(size)
        self.register_buffer("key_kw", key_kw, persistent=False)
        self.register_buffer("key_dw_hw", key_dw_hw, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, s, s, s, dim] with s = self.size -> same shape."""
        s, nh = self.size, self.num_heads
        t = s * s * s
        qkv = self.qkv(x).reshape(-1, t, 3, nh, self.dim // nh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, nh, T, hd]
        attn = self._logits(q, k)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).permute(0, 2, 1, 3).reshape(-1, s, s, s, self.dim)
        return self.proj(out)

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """scale * q.k plus SAM-Med3D's decomposed relative-position terms: [B, nh, T, T].

        rel_X[b, n, d, h, w, j] = q[b, n, (d, h, w)] . R_X[x, j] (x the query's coordinate on
        axis X). SAM-Med3D's `add_decomposed_rel_pos` broadcasts these onto the
        [qd, qh, qw, kd, kh, kw] attention grid with `rel_d[..., None, None]`,
        `rel_h[:, :, :, None, :, None]` and `rel_w[:, :, :, None, None, :]`, which (a 2D->3D
        port of SAM) lines the j axis of every term up with kw, and the query's w / h axis of
        rel_h / rel_w up with kd / kh. So query (qd, qh, qw) and key (kd, kh, kw) get
            rel_d[qd, qh, qw, kw] + rel_h[qd, qh, kd, kw] + rel_w[qd, qh, kh, kw].
        The released weights were trained with exactly that arithmetic, so it is kept; a
        textbook MViTv2 layout would change every pretrained block.

        Written as SAM-Med3D writes it, three broadcast adds onto the T x T logits took 27 %
        of the tiny network's inference time in torch and 59 % in OpenVINO (strided broadcasts
        run at a fraction of memory bandwidth). Here the first term rides along in the q.k
        matmul (one-hot columns of kw appended to the keys), and the other two, which do not
        depend on qw, are one small matmul against one-hot (kd, kw) / (kh, kw) rows, added
        to the logits with a broadcast over qw only (contiguous rows of T).
        """
        s, nh, hd = self.size, self.num_heads, self.dim // self.num_heads
        t = s * s * s
        r_q = q.reshape(-1, nh, s, s, s, hd)
        rel_d = torch.einsum("bndhwc,dkc->bndhwk", r_q, self.rel_pos_d[self.rel_index])
        rel_h = torch.einsum("bndhwc,hkc->bndhwk", r_q, self.rel_pos_h[self.rel_index])
        rel_w = torch.einsum("bndhwc,wkc->bndhwk", r_q, self.rel_pos_w[self.rel_index])
        keys_kw = self.key_kw.to(k.dtype).expand(k.shape[0], nh, t, s)
        attn = torch.cat([q * self.scale, rel_d.reshape(-1, nh, t, s)], -1) \
            @ torch.cat([k, keys_kw], -1).transpose(-2, -1)
        plane = torch.cat([rel_h.reshape(-1, nh, s * s, s * s),
                           rel_w.reshape(-1, nh, s * s, s * s)], -1)  # rows (qd, qh)
        bias = plane @ self.key_dw_hw.to(plane.dtype)  # [B, nh, s*s, T]
        attn = attn.reshape(-1, nh, s * s, s, t) + bias.reshape(-1, nh, s * s, 1, t)
        return attn.reshape(-1, nh, t, t)


def key_one_hots(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For keys (kd, kh, kw) flattened D-major: [T, s] one-hot of kw, and [2 s^2, T] with
    row (i, j) = [kd == i and kw == j], then row s^2 + (i, j) = [kh == i and kw == j]."""
    grid = torch.arange(size)
    kd, kh, kw = (c.reshape(-1) for c in torch.meshgrid(grid, grid, grid, indexing="ij"))
    key_kw = (kw[:, None] == grid[None, :]).float()
    pairs = grid[:, None] * size + grid[None, :]  # (i, j) -> row i*s + j
    dw = (pairs.reshape(-1, 1) == (kd * size + kw)[None, :]).float()
    hw = (pairs.reshape(-1, 1) == (kh * size + kw)[None, :]).float()
    return key_kw, torch.cat([dw, hw])


def window_partition(x: torch.Tensor, grid: int, window: int) -> torch.Tensor:
    """[N, g, g, g, C] -> [N * nw^3, w, w, w, C], zero-padding g up to a multiple of w."""
    pad = (window - grid % window) % window
    if pad:
        x = F.pad(x, (0, 0, 0, pad, 0, pad, 0, pad))
    nw = (grid + pad) // window
    c = x.shape[-1]
    x = x.reshape(-1, nw, window, nw, window, nw, window, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, c)


def window_unpartition(x: torch.Tensor, grid: int, window: int) -> torch.Tensor:
    """Inverse of `window_partition`, cropping the padding away."""
    padded = math.ceil(grid / window) * window
    nw = padded // window
    c = x.shape[-1]
    x = x.reshape(-1, nw, nw, nw, window, window, window, c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, padded, padded, padded, c)
    if padded > grid:
        x = x[:, :grid, :grid, :grid, :]
    return x


class Block3D(nn.Module):
    """SAM-Med3D transformer block followed by the CMC adapter:
    x += Attn(LN1(x)); x += MLP(LN2(x)); x += s * Adapter(x).

    window > 0: attention inside non-overlapping window^3 cubes (grid zero-padded);
    window == 0: global attention over the whole grid.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid: int, window: int,
                 adapter_dim: int, adapter_scale: float) -> None:
        super().__init__()
        self.grid = grid
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, window if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.adapter = Adapter(dim, adapter_dim)
        self.adapter_scale = adapter_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.window > 0:
            h = window_unpartition(self.attn(window_partition(h, self.grid, self.window)),
                                   self.grid, self.window)
        else:
            h = self.attn(h)
        x = x + h
        x = x + self.mlp(self.norm2(x))
        return x + self.adapter_scale * self.adapter(x)


class ImageEncoderViT3D(nn.Module):
    """SAM-Med3D image encoder with adapters; returns the neck output and chosen hidden states.

    Args:
        img_size: cubic input edge S.
        patch: ViT patch edge p (S/p = token grid g).
        skip_blocks: indices of blocks whose outputs are returned as hidden states
            (channels-last [N, g, g, g, d]) for the decoder's skip connections.
    """

    def __init__(self, img_size: int, patch: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, window_size: int, global_attn_indexes: tuple[int, ...],
                 neck_channels: int, adapter_dim: int, adapter_scale: float,
                 skip_blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.grid = img_size // patch
        self.skip_blocks = skip_blocks
        self.patch_embed = PatchEmbed3D(patch, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid, self.grid, self.grid, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block3D(embed_dim, num_heads, mlp_ratio, self.grid,
                    0 if i in global_attn_indexes else window_size,
                    adapter_dim, adapter_scale)
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, neck_channels, kernel_size=1, bias=False),
            LayerNorm3d(neck_channels),
            nn.Conv3d(neck_channels, neck_channels, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(neck_channels),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [N, 1, S, S, S] -> (neck features [N, c, g, g, g], hidden states of skip_blocks)."""
        x = self.patch_embed(x) + self.pos_embed
        hidden: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.skip_blocks:
                hidden.append(x)
        return self.neck(x.permute(0, 4, 1, 2, 3)), hidden

    def pretrained_frozen_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters kept fixed when SAM-Med3D weights are loaded (docs/METHOD.md,
        'Network'): patch embedding, absolute position embedding and every attention layer."""
        return [(name, p) for name, p in self.named_parameters()
                if name.startswith(("patch_embed.", "pos_embed")) or ".attn." in name]
