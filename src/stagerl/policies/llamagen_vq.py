"""LlamaGen's VQ-16 image tokenizer, written for stagerl: encoder, quantizer (nearest
L2-normalised codebook vector) and decoder.

Same computation as FoundationVision/LlamaGen (Sun et al. 2024, MIT;
``tokenizer/tokenizer_image/vq_model.py``), implemented here from its description and checked
against the official modules (tests/test_llamagen_parity.py). Parameter names follow the official
VQ checkpoints so that ``vq_ds16_*.pt`` loads as it is (docs/llamagen.md). The GPT is in
:mod:`stagerl.policies.llamagen_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQConfig:
    """The VQ tokenizer (official VQ-16: ch 128, ch_mult 1,1,2,2,4, z 256, codebook 16384 x 8)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    num_res_blocks: int = 2

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class SelfAttn2d(nn.Module):
    """Single-head self-attention over the pixels of a feature map (1x1 conv projections)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)  # [b, hw, c]
        k = self.k(h).flatten(2)  # [b, c, hw]
        v = self.v(h).flatten(2)  # [b, c, hw]
        attn = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # [b, hw_q, hw_k]
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class _Level(nn.Module):
    """One resolution: ``res`` blocks, ``attn`` blocks (lowest resolution only), a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Resample(nn.Module):
    def __init__(self, ch: int, up: bool) -> None:
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, stride 2


class VQEncoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level, last = _Level(), i == len(mult) - 1
            for _ in range(n):
                level.res.append(ResBlock(cin, ch * m))
                cin = ch * m
                if last:
                    level.attn.append(SelfAttn2d(cin))
            if not last:
                level.downsample = _Resample(cin, up=False)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResBlock(cin, cin), SelfAttn2d(cin), ResBlock(cin, cin)])
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQDecoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(cin, cin), SelfAttn2d(cin), ResBlock(cin, cin)])
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            level, lowest = _Level(), i == len(mult) - 1
            for _ in range(n + 1):
                level.res.append(ResBlock(cin, ch * mult[i]))
                cin = ch * mult[i]
                if lowest:
                    level.attn.append(SelfAttn2d(cin))
            if i != 0:
                level.upsample = _Resample(cin, up=True)
            self.conv_blocks.append(level)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            for j, res in enumerate(level.res):
                h = res(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    """Nearest L2-normalised codebook vector (cosine similarity) per latent pixel."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)  # [V, d]

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """[B, d, h, w] latents -> [B, h*w] ids (raster order)."""
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, z.shape[1]), dim=-1)
        return torch.cdist(flat, self.codebook()[None].expand(z.shape[0], -1, -1)).argmin(-1)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VQEncoder(cfg)
        self.decoder = VQDecoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def decode_codes(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, h*w] ids -> [B, 3, h*f, w*f] pixels, about [-1, 1]."""
        q = self.quantize.codebook()[codes]  # [B, L, d]
        q = q.reshape(codes.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(q))

    def encode_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] pixels in [-1, 1] -> [B, (H/f)*(W/f)] ids."""
        return self.quantize.indices(self.quant_conv(self.encoder(pixels)))
