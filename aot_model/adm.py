"""ADM's noise-aware encoder U-Net (``EncoderUNetModel`` of openai/guided-diffusion), as DG uses it.

Discriminator Guidance (method-notes c.2) builds both halves of its discriminator from this
architecture: the frozen 32x32 classifier that supplies a 512x8x8 feature map (the middle block's
output, before the pooling head), and the small trainable head on that map that pools to one logit.
Module and parameter names follow ADM's state-dict layout (``time_embed.0``, ``input_blocks.3.0``,
``middle_block.1.qkv``, ``out.2.c_proj``, ...) so that a user-supplied ADM classifier checkpoint
(``32x32_classifier.pt``) loads with ``strict=True``; :func:`load_encoder` refuses anything else
with the offending keys named.

Architecture (ADM, "Diffusion Models Beat GANs"; written here from its description):

* timestep t (DG passes VP time tau * 999) -> 128-d sinusoid [cos, sin] with frequencies
  ``10000^(-i/half)`` -> Linear -> SiLU -> Linear (width 4 * model_channels);
* a 3x3 input conv, then per level ``num_res_blocks`` residual blocks (each followed by multi-head
  self-attention when the level's downsampling factor is listed in ``attention_ds``) and, except
  after the last level, a residual block that halves the resolution by average pooling;
* residual block: GroupNorm(32) -> SiLU -> 3x3 conv; the embedding gives a per-channel (scale,
  shift) applied as ``norm(h) * (1 + scale) + shift`` ("scale-shift norm") -> SiLU -> 3x3 conv
  (zero-initialised); 1x1 conv skip when the width changes;
* middle block: residual block, attention, residual block (the DG feature map);
* head: GroupNorm -> SiLU -> attention pooling (mean token plus learned positional embedding,
  multi-head attention, the mean token's output projected to ``out_channels``).

DG's two configurations (:data:`ADM32_CLASSIFIER`, :data:`DG_HEAD`) have 47,771,112 and 2,883,841
parameters (3,395,841 with the class embedding), the counts given in method-notes c.2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aot_model.checks import check_int
from aot_model.files import DamagedFileError, atomic_write, load_torch_file

MAX_PERIOD = 10_000
NORM_GROUPS = 32

# ADM's 32x32 classifier as DG loads it (width 128, depth 4, (1, 2, 4), attention at 32/16/8).
ADM32_CLASSIFIER = {
    "image_size": 32,
    "in_channels": 3,
    "model_channels": 128,
    "out_channels": 1000,
    "num_res_blocks": 4,
    "attention_ds": (1, 2, 4),
    "channel_mult": (1, 2, 4),
    "num_head_channels": 64,
    "num_classes": 0,
}
# DG's trainable head on the classifier's 512x8x8 features (num_classes=1000 when conditional).
DG_HEAD = {
    **ADM32_CLASSIFIER,
    "image_size": 8,
    "in_channels": 512,
    "out_channels": 1,
    "num_res_blocks": 2,
    "attention_ds": (1,),
    "channel_mult": (1,),
}


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """ADM's sinusoid: ``[cos(t f_i), sin(t f_i)]`` with ``f_i = 10000^(-i / (dim/2))``.

    (EDM's :class:`aot_model.networks.PositionalEmbedding` spaces the exponents by ``half - 1``
    and orders [sin, cos]; a loaded ADM checkpoint needs this variant.)
    """
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head attention over tokens: q, k, v and the result are ``[B, heads * ch, T]``."""
    b, width = q.shape[:2]

    def split(x: Tensor) -> Tensor:  # [B, H*ch, T] -> [B, H, T, ch]
        # Contiguous: the fused (flash, memory-efficient) kernels need a last-dim stride of 1;
        # the math fallback stores the [T, T] weights (~10 GB in guided sampling's backward).
        return x.reshape(b, heads, width // heads, -1).transpose(2, 3).contiguous()

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(2, 3).reshape(b, width, -1)


class ResBlock(nn.Module):
    """ADM residual block with scale-shift norm, optionally halving the resolution."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, down: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.down = down
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers[:-1](x)
        if self.down:  # ADM resamples between the activation and the conv, and on the skip path
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.in_layers[-1](h)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        return self.skip_connection(x) + self.out_layers[1:](h)


class AttentionBlock(nn.Module):
    """ADM self-attention over pixels; qkv channels in ADM's legacy per-head [q, k, v] order."""

    def __init__(self, channels: int, num_head_channels: int):
        super().__init__()
        self.heads = channels // num_head_channels
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        per_head = qkv.reshape(b, self.heads, 3, c // self.heads, -1)
        q, k, v = (per_head[:, :, i].reshape(b, c, -1) for i in range(3))
        return (flat + self.proj_out(_attention(q, k, v, self.heads))).reshape(x.shape)


class AttentionPool2d(nn.Module):
    """ADM's attention pooling: the mean token attends to all pixels (qkv in [q; k; v] order)."""

    def __init__(self, spatial: int, channels: int, num_head_channels: int, out_channels: int):
        super().__init__()
        self.heads = channels // num_head_channels
        self.positional_embedding = nn.Parameter(
            torch.randn(channels, spatial**2 + 1) / channels**0.5
        )
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(*x.shape[:2], -1)
        tokens = torch.cat([flat.mean(-1, keepdim=True), flat], dim=-1) + self.positional_embedding
        q, k, v = self.qkv_proj(tokens).chunk(3, dim=1)
        return self.c_proj(_attention(q, k, v, self.heads))[:, :, 0]


class EmbedSequential(nn.Sequential):
    """A sequence whose residual blocks also receive the time embedding (ADM's layout)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class EncoderUNet(nn.Module):
    """ADM's ``EncoderUNetModel``: attention pooling, scale-shift norm, resblock downsampling.

    Input ``[B, in_channels, image_size, image_size]``. ``model_channels`` is the base width (a
    multiple of 32 for GroupNorm(32); the time embedding is 4x wider), ``channel_mult`` the width
    multiplier per level (the resolution halves between levels), ``attention_ds`` the downsampling
    factors (1 = input resolution, 2, 4, ...) whose blocks get self-attention, ``out_channels`` the
    pooling head's outputs (1000 classes for ADM's classifier, 1 logit for DG's head).
    ``num_classes > 0`` adds an ``nn.Embedding(num_classes, 4 * width)`` of the class id to the time
    embedding (DG's conditional head).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_ds: Sequence[int],
        channel_mult: Sequence[int],
        num_head_channels: int,
        num_classes: int = 0,
    ):
        super().__init__()
        check_int("model_channels", model_channels, NORM_GROUPS)
        check_int("num_head_channels", num_head_channels, 1)
        check_int("num_res_blocks", num_res_blocks, 1)
        levels = len(channel_mult)
        if not levels or image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size ({image_size}) must be divisible by 2**(len(channel_mult) - 1)"
            )
        widths = [model_channels * m for m in channel_mult]
        if any(w % NORM_GROUPS or w % num_head_channels for w in widths):
            raise ValueError(
                f"every level width model_channels * mult must be a multiple of {NORM_GROUPS} and "
                f"of num_head_channels={num_head_channels}, got widths {widths}"
            )
        self.config = {
            "image_size": image_size,
            "in_channels": in_channels,
            "model_channels": model_channels,
            "out_channels": out_channels,
            "num_res_blocks": num_res_blocks,
            "attention_ds": tuple(attention_ds),
            "channel_mult": tuple(channel_mult),
            "num_head_channels": num_head_channels,
            "num_classes": num_classes,
        }
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb)
        )
        if num_classes:
            self.label_emb = nn.Embedding(num_classes, emb)
        blocks = [EmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, num_head_channels))
                blocks.append(EmbedSequential(*layers))
            if level < levels - 1:
                blocks.append(EmbedSequential(ResBlock(ch, emb, ch, down=True)))
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = EmbedSequential(
            ResBlock(ch, emb, ch), AttentionBlock(ch, num_head_channels), ResBlock(ch, emb, ch)
        )
        self.feature_channels, self.feature_size = ch, image_size // ds
        self.out = nn.Sequential(
            _norm(ch),
            nn.SiLU(),
            AttentionPool2d(self.feature_size, ch, num_head_channels, out_channels),
        )

    def features(self, x: Tensor, t: Tensor, class_ids: Tensor | None = None) -> Tensor:
        """The middle block's output ``[B, feature_channels, feature_size, feature_size]``."""
        sinusoid = timestep_embedding(t, self.config["model_channels"])
        emb = self.time_embed(sinusoid.to(self.time_embed[0].weight.dtype))
        if self.config["num_classes"]:
            if class_ids is None:
                raise ValueError("this network is class-conditional: pass class_ids [B]")
            emb = emb + self.label_emb(class_ids)
        for block in self.input_blocks:
            x = block(x, emb)
        return self.middle_block(x, emb)

    def forward(self, x: Tensor, t: Tensor, class_ids: Tensor | None = None) -> Tensor:
        """Pooled outputs ``[B, out_channels]`` (class logits, or DG's one logit)."""
        return self.out(self.features(x, t, class_ids))


def save_encoder(path: str | Path, net: EncoderUNet, **info) -> str:
    """Write ``{"config", "state_dict", "info"}`` atomically; returns the file's SHA-256."""
    payload = {"config": dict(net.config), "state_dict": net.state_dict(), "info": info}
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_encoder(
    path: str | Path,
    config: dict | None = None,
    device: torch.device | str = "cpu",
    *,
    remedy: str = "rebuild it with the step that wrote it",
) -> tuple[EncoderUNet, dict]:
    """``(net in eval mode, the file's info dict)`` from a :func:`save_encoder` file, or from a bare
    ADM state dict such as ``32x32_classifier.pt`` (empty info) whose architecture ``config``
    gives, e.g. :data:`ADM32_CLASSIFIER`; ``torch.load(weights_only=True)``.

    A missing, truncated, corrupt or foreign file is a one-line FileNotFoundError or
    DamagedFileError naming it and ending with ``remedy``; tensors that do not fit the architecture
    are a ValueError naming the first few missing, unexpected or misshapen keys.
    """
    payload = load_torch_file(path, what="encoder checkpoint", remedy=remedy)
    if not isinstance(payload, dict):
        raise DamagedFileError(
            f"{path} holds a {type(payload).__name__}, not a state dict; {remedy}"
        )
    if "config" in payload and "state_dict" in payload:
        config, state, info = payload["config"], payload["state_dict"], payload.get("info", {})
    elif config is not None:
        state, info = payload, {}
    else:
        raise DamagedFileError(
            f"{path} is not an encoder file (keys 'config' and 'state_dict'); {remedy}"
        )
    with torch.device("meta"):
        expected = EncoderUNet(**config).state_dict()
    problems = _state_mismatch(expected, state)
    if problems:
        raise ValueError(f"{path} does not fit the architecture {config}: {problems}")
    net = EncoderUNet(**config)
    net.load_state_dict(state)
    return net.to(device).eval(), info


def _state_mismatch(expected: dict, state: dict) -> str:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    parts = [
        f"{label} {len(keys)}: {', '.join(keys[:3])}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", shapes))
        if keys
    ]
    return "; ".join(parts)
