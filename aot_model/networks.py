"""EDM denoiser: the SongUNet backbone (DDPM++ / NCSN++) wrapped in EDM preconditioning.

References
----------
Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM),
Table 1 (preconditioning) and Appendix F.2 (DDPM++ / NCSN++ as configured for CIFAR-10); Song et al.
2021 (score SDE) for the original U-Nets. The configuration follows EDM's ``train.py`` CIFAR-10
settings (see method-notes b.1 and b.4); with them the parameter counts equal those of
NVlabs/edm exactly (55,733,891 DDPM++ / 56,397,827 NCSN++, unconditional with augmentation input).

Deliberate differences from NVlabs/edm, none of which changes a parameter count or a trained model's
function class:

- The noise embedding is built directly as [sin, cos] (EDM builds [cos, sin] and swaps the halves).
- Attention uses ``F.scaled_dot_product_attention`` (same math: one head, softmax(q^T k / sqrt(C)));
  the qkv channels are interleaved as in EDM (channel 3c + j holds component j of channel c).
- Resampling is a separate fixed-filter module, so state-dict keys differ from EDM's pickles.
"""

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aot_model.checks import check_choice

SKIP_SCALE = math.sqrt(0.5)
GROUPNORM_EPS = 1e-6
# EDM's "init_zero" gain: the last conv of every residual branch, attention projection and output.
NEAR_ZERO_GAIN = 1e-5
# EDM's gain for the qkv projection of self-attention.
ATTN_QKV_GAIN = math.sqrt(0.2)
# Fixed seed of the NCSN++ Fourier frequencies; see FourierEmbedding.
FOURIER_SEED = 0

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "residual")
DECODER_TYPES = ("standard",)
ARCHS = ("ddpmpp", "ncsnpp")


@dataclasses.dataclass(frozen=True)
class NetworkDefaults:
    """The denoiser trained unless told otherwise, in one place: SongUNet's and EDMPrecond's keyword
    defaults, the training loop's and the params.yaml schema's read it. EDM train.py's CIFAR-10
    network (method-notes b.4) in EDM-AOT's architecture."""

    arch: str = "ncsnpp"  # EDM-AOT trains NCSN++ (method-notes a.3); EDM's train.py said ddpmpp
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    num_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.13


NETWORK_DEFAULTS = NetworkDefaults()

# EDM train.py, CIFAR-10. SongUNet's own keyword defaults are the DDPM++ values, so DDPM++ needs no
# overrides and NCSN++ lists only what differs.
ARCH_PRESETS: dict[str, dict] = {
    "ddpmpp": {},
    "ncsnpp": {
        "embedding_type": "fourier",
        "channel_mult_noise": 2,
        "encoder_type": "residual",
        "resample_filter": (1, 3, 3, 1),
    },
}


def _linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """Linear layer with EDM's initialisation: xavier-uniform weight, zero bias."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(
    in_channels: int, out_channels: int, kernel: int, gain: float = 1.0, padding: int | None = None
) -> nn.Conv2d:
    """Conv layer with xavier-uniform weight scaled by ``gain`` and zero bias ("same" padding)."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel, padding=kernel // 2 if padding is None else padding
    )
    nn.init.xavier_uniform_(conv.weight, gain=gain)
    nn.init.zeros_(conv.bias)
    return conv


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with at most 32 groups and at least 4 channels per group (EDM)."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=GROUPNORM_EPS)


class Resample(nn.Module):
    """Factor-2 up- or down-sampling with a fixed separable FIR filter, applied per channel.

    The filter is the outer product of ``fir`` with itself, normalised to unit sum (times 4 when
    upsampling, so a constant image stays constant). [1, 1] is box/nearest resampling, [1, 3, 3, 1]
    the smoother filter of NCSN++.

    Parameters
    ----------
    channels : int
        Number of channels of the input (the filter is depthwise).
    direction : {"up", "down"}
    fir : sequence of float
        1-D filter taps, even length.
    padding : int, optional
        Spatial padding; default ``(len(fir) - 1) // 2`` keeps the size exactly halved/doubled.
    """

    def __init__(
        self, channels: int, direction: str, fir: Sequence[float], padding: int | None = None
    ):
        super().__init__()
        # Kept though only this module builds it: any other string would silently mean down.
        check_choice("direction", direction, ("up", "down"))
        taps = torch.as_tensor(fir, dtype=torch.float32)
        kernel = torch.outer(taps, taps) / taps.sum().square()
        if direction == "up":
            kernel = kernel * 4
        size = kernel.shape[-1]
        # Constant filter, rebuilt at construction: not part of the state dict.
        self.register_buffer(
            "kernel", kernel.expand(channels, 1, size, size).clone(), persistent=False
        )
        self.channels = channels
        self.upsample = direction == "up"
        self.padding = (size - 1) // 2 if padding is None else padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Resample ``x`` [N, C, H, W] to [N, C, 2H, 2W] (up) or [N, C, H/2, W/2] (down)."""
        kernel = self.kernel.to(x.dtype)
        if self.upsample:
            return F.conv_transpose2d(
                x, kernel, stride=2, padding=self.padding, groups=self.channels
            )
        return F.conv2d(x, kernel, stride=2, padding=self.padding, groups=self.channels)


def _resampled_conv(
    in_channels: int, out_channels: int, kernel: int, direction: str | None, fir: Sequence[float]
) -> nn.Module:
    """Resample first (if ``direction``), then convolve: EDM's non-fused resampling conv."""
    conv = _conv(in_channels, out_channels, kernel)
    if direction is None:
        return conv
    return nn.Sequential(Resample(in_channels, direction, fir), conv)


class SelfAttention(nn.Module):
    """Single-head self-attention over pixels with a residual connection scaled by sqrt(0.5).

    Parameters
    ----------
    channels : int
        Channels C of the input; queries/keys/values are C-dimensional (one head).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = _conv(channels, 3 * channels, 1, gain=ATTN_QKV_GAIN)
        self.proj = _conv(channels, channels, 1, gain=NEAR_ZERO_GAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map x [N, C, H, W] to (x + proj(attention(x))) * sqrt(0.5), same shape."""
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, c, 3, h * w)
        # [N, C, 3, L] -> 3 x [N, 1, L, C]: one head, L = H * W tokens of dimension C, copied once
        # into a contiguous layout: the fused (flash, memory-efficient) kernels need a last-dim
        # stride of 1 and would otherwise fall back to the math path, which stores [L, L] weights.
        q, k, v = (t.unsqueeze(1) for t in qkv.permute(2, 0, 3, 1).contiguous().unbind(0))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(n, c, h, w)
        return (x + self.proj(out)) * SKIP_SCALE


class UNetBlock(nn.Module):
    """Residual block of DDPM++/NCSN++ with the noise embedding added as a per-channel bias.

    norm -> SiLU -> (resample) 3x3 conv -> + Linear(emb) -> norm -> SiLU -> dropout -> 3x3 conv
    (near-zero init), plus a skip path (1x1 conv when channels change or the block resamples), the
    sum scaled by sqrt(0.5), optionally followed by self-attention.

    Parameters
    ----------
    in_channels, out_channels : int
    emb_channels : int
        Width of the embedding vector ``emb`` [N, emb_channels].
    direction : {"up", "down"} or None
        Resample by 2 in both the residual and the skip path.
    attention : bool
    dropout : float
    fir : sequence of float
        Resampling filter taps.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        direction: str | None = None,
        attention: bool = False,
        dropout: float,  # no default: the network passes its own to every block
        fir: Sequence[float] = (1, 1),
    ):
        super().__init__()
        self.norm0 = _group_norm(in_channels)
        self.conv0 = _resampled_conv(in_channels, out_channels, 3, direction, fir)
        self.affine = _linear(emb_channels, out_channels)
        self.norm1 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(out_channels, out_channels, 3, gain=NEAR_ZERO_GAIN)
        needs_projection = direction is not None or in_channels != out_channels
        self.skip = (
            _resampled_conv(in_channels, out_channels, 1, direction, fir)
            if needs_projection
            else nn.Identity()
        )
        self.attention = SelfAttention(out_channels) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [N, in_channels, H, W], emb [N, emb_channels] -> [N, out_channels, H', W']."""
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(self.dropout(h))
        return self.attention((h + self.skip(x)) * SKIP_SCALE)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of the noise level (DDPM++), EDM's endpoint=True variant.

    Frequencies are (1 / max_positions) ** (i / (channels/2 - 1)), i = 0 .. channels/2 - 1, so the
    last frequency is exactly 1 / max_positions.
    """

    def __init__(self, channels: int, max_positions: int = 10000):
        super().__init__()
        half = channels // 2
        exponents = torch.arange(half, dtype=torch.float32) / (half - 1)
        self.register_buffer("freqs", (1.0 / max_positions) ** exponents, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [N] -> [N, channels] = [sin(t f), cos(t f)]."""
        arg = torch.outer(t, self.freqs)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise level (NCSN++): [sin(2 pi f t), cos(2 pi f t)].

    f ~ N(0, scale^2) is a buffer drawn once at construction. It is drawn on the CPU from a
    ``torch.Generator`` seeded with ``FOURIER_SEED`` rather than from the global RNG, so every
    construction gives bit-identical frequencies: all DDP ranks agree even without buffer
    broadcast (the EDM-AOT fork trains with ``broadcast_buffers=False``), and a network rebuilt for
    sampling or evaluation matches the trained one whatever the global seed. The buffer is still
    saved in checkpoints, so a checkpoint carries its own frequencies.
    """

    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(FOURIER_SEED)
        freqs = torch.randn(channels // 2, generator=generator, device="cpu") * scale
        self.register_buffer("freqs", freqs.to(torch.get_default_device()))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [N] -> [N, channels]."""
        arg = torch.outer(t, 2 * math.pi * self.freqs)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net of Song et al. 2021 as reimplemented in EDM (Appendix F.2).

    Keyword defaults are EDM's DDPM++ CIFAR-10 settings; ``ARCH_PRESETS["ncsnpp"]`` lists the
    NCSN++ differences (Fourier embedding, residual encoder, [1, 3, 3, 1] filter).

    Parameters
    ----------
    img_resolution : int
        Input height and width.
    in_channels, out_channels : int
    label_dim : int
        Number of classes (0: unconditional). Labels are one-hot floats scaled by sqrt(label_dim).
    augment_dim : int
        Length of the augmentation label vector (0: no augmentation conditioning).
    model_channels : int
        Base width; level i has ``model_channels * channel_mult[i]`` channels.
    channel_mult : sequence of int
        Width multiplier per resolution level; level i runs at ``img_resolution / 2**i``.
    channel_mult_emb : int
        Embedding width = ``model_channels * channel_mult_emb``.
    num_blocks : int
        Residual blocks per level in the encoder (the decoder has one more).
    attn_resolutions : sequence of int
        Resolutions with self-attention (the first decoder block at the coarsest level always
        has it).
    dropout : float
        Dropout inside residual blocks.
    label_dropout : float
        Probability of zeroing an image's class label during training.
    embedding_type : {"positional", "fourier"}
    channel_mult_noise : int
        Noise-embedding width = ``model_channels * channel_mult_noise``.
    encoder_type : {"standard", "residual"}
        "residual" adds NCSN++'s progressive-growing input path: at each downsampling a strided
        3x3 conv of the previous level's (input-pyramid) features, summed and scaled by sqrt(0.5).
    decoder_type : {"standard"}
    resample_filter : sequence of float
        FIR taps for up/down-sampling.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = NETWORK_DEFAULTS.model_channels,
        channel_mult: Sequence[int] = NETWORK_DEFAULTS.channel_mult,
        channel_mult_emb: int = 4,
        num_blocks: int = NETWORK_DEFAULTS.num_blocks,
        attn_resolutions: Sequence[int] = NETWORK_DEFAULTS.attn_resolutions,
        dropout: float = NETWORK_DEFAULTS.dropout,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ):
        super().__init__()
        check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        check_choice("decoder_type", decoder_type, DECODER_TYPES)
        if len(channel_mult) == 0:
            raise ValueError("channel_mult must list at least one level, got []")
        factor = 2 ** (len(channel_mult) - 1)
        if img_resolution < factor or img_resolution % factor:
            raise ValueError(
                "img_resolution must be a positive multiple of 2**(len(channel_mult) - 1) = "
                f"{factor}, got {img_resolution}"
            )
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        for name, p in (("dropout", dropout), ("label_dropout", label_dropout)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if len(resample_filter) == 0 or len(resample_filter) % 2 or min(resample_filter) <= 0:
            raise ValueError(
                "resample_filter must be a non-empty even-length sequence of positive taps "
                f"(e.g. [1, 1] or [1, 3, 3, 1]), got {list(resample_filter)}"
            )
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.residual_encoder = encoder_type == "residual"
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        self._build_mapping(embedding_type, noise_channels, emb_channels)

        block = dict(emb_channels=emb_channels, dropout=dropout, fir=tuple(resample_filter))
        skip_channels = self._build_encoder(
            model_channels, channel_mult, num_blocks, attn_resolutions, block
        )
        self._build_decoder(
            model_channels, channel_mult, num_blocks, attn_resolutions, block, skip_channels
        )
        width = model_channels * channel_mult[0]
        self.out_norm = _group_norm(width)
        # EDM's init: 1e-5 * xavier, so a fresh denoiser is c_skip * x up to ~1e-5 (not exactly).
        self.out_conv = _conv(width, out_channels, 3, gain=NEAR_ZERO_GAIN)

    def _build_mapping(self, embedding_type: str, noise_channels: int, emb_channels: int) -> None:
        """Noise embedding plus optional class/augment embeddings, then a 2-layer SiLU MLP."""
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = _linear(self.label_dim, noise_channels) if self.label_dim else None
        self.map_augment = (
            _linear(self.augment_dim, noise_channels, bias=False) if self.augment_dim else None
        )
        self.map_layer0 = _linear(noise_channels, emb_channels)
        self.map_layer1 = _linear(emb_channels, emb_channels)

    def _build_encoder(self, model_channels, channel_mult, num_blocks, attn_resolutions, block):
        """Create the encoder; return the channel count of every skip it produces, in order."""
        self.enc_in = _conv(self.in_channels, model_channels, 3)
        self.enc_down = nn.ModuleList()
        self.enc_aux = nn.ModuleList()
        self.enc_blocks = nn.ModuleList()
        skip_channels = [model_channels]
        width, aux_width = model_channels, self.in_channels
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            if level > 0:
                self.enc_down.append(UNetBlock(width, width, direction="down", **block))
                skip_channels.append(width)
                if self.residual_encoder:
                    self.enc_aux.append(self._aux_residual(aux_width, width, block["fir"]))
                    aux_width = width
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                out = model_channels * mult
                blocks.append(UNetBlock(width, out, attention=res in attn_resolutions, **block))
                skip_channels.append(out)
                width = out
            self.enc_blocks.append(blocks)
        return skip_channels

    @staticmethod
    def _aux_residual(in_channels: int, out_channels: int, fir: Sequence[float]) -> nn.Module:
        """NCSN++ input-pyramid path: 3x3 conv then filtered stride-2 subsampling (EDM's fused
        resampling order: the conv pads by the filter's extra support instead of the filter)."""
        pad = (len(fir) - 1) // 2
        return nn.Sequential(
            _conv(in_channels, out_channels, 3, padding=1 + pad),
            Resample(out_channels, "down", fir, padding=0),
        )

    def _build_decoder(
        self, model_channels, channel_mult, num_blocks, attn_resolutions, block, skip_channels
    ):
        """Create the decoder: two middle blocks, then per level (coarse to fine) an upsampling
        block (except at the coarsest) and num_blocks + 1 blocks each eating one encoder skip."""
        skips = list(skip_channels)
        width = skips[-1]
        self.dec_mid = nn.ModuleList(
            [UNetBlock(width, width, attention=True, **block), UNetBlock(width, width, **block)]
        )
        self.dec_up = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            res = self.img_resolution >> level
            if level < len(channel_mult) - 1:
                self.dec_up.append(UNetBlock(width, width, direction="up", **block))
            blocks = nn.ModuleList()
            for idx in range(num_blocks + 1):
                out = model_channels * channel_mult[level]
                attention = idx == num_blocks and res in attn_resolutions
                blocks.append(UNetBlock(width + skips.pop(), out, attention=attention, **block))
                width = out
            self.dec_blocks.append(blocks)

    def _check_conditioning(self, n: int, class_labels, augment_labels) -> None:
        if self.label_dim and (class_labels is None or class_labels.shape != (n, self.label_dim)):
            got = None if class_labels is None else tuple(class_labels.shape)
            raise ValueError(f"class_labels must have shape ({n}, {self.label_dim}), got {got}")
        if not self.label_dim and class_labels is not None:
            raise ValueError("class_labels must be None for an unconditional model (label_dim=0)")
        if augment_labels is not None and augment_labels.shape != (n, self.augment_dim):
            raise ValueError(
                f"augment_labels must be None or have shape ({n}, {self.augment_dim}), "
                f"got {tuple(augment_labels.shape)}"
            )

    def embed(
        self,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """Embedding [N, emb_channels] of noise level, class and augmentation labels."""
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        # No bias in map_augment: skipping it is the same as all-zero augmentation labels.
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """F_theta(x; noise_labels).

        Parameters
        ----------
        x : Tensor [N, in_channels, R, R]
        noise_labels : Tensor [N]
            EDM's c_noise(sigma) = ln(sigma) / 4.
        class_labels : Tensor [N, label_dim] or None
            One-hot floats; required iff label_dim > 0.
        augment_labels : Tensor [N, augment_dim] or None
            None is the same as zeros (no augmentation).

        Returns
        -------
        Tensor [N, out_channels, R, R]
        """
        self._check_conditioning(x.shape[0], class_labels, augment_labels)
        emb = self.embed(noise_labels, class_labels, augment_labels)
        image = x
        x = self.enc_in(x)
        skips = [x]
        for level, blocks in enumerate(self.enc_blocks):
            if level > 0:
                x = self.enc_down[level - 1](x, emb)
                if self.residual_encoder:
                    x = image = (x + self.enc_aux[level - 1](image)) * SKIP_SCALE
                skips.append(x)
            for block in blocks:
                x = block(x, emb)
                skips.append(x)

        for block in self.dec_mid:
            x = block(x, emb)
        for level, blocks in enumerate(self.dec_blocks):
            if level > 0:
                x = self.dec_up[level - 1](x, emb)
            for block in blocks:
                x = block(torch.cat([x, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(x)))


def preconditioning(
    sigma: torch.Tensor, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning coefficients (EDM Table 1, "Ours" column; method-notes b.1).

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4.

    Parameters
    ----------
    sigma : Tensor, any shape
    sigma_data : float

    Returns
    -------
    c_skip, c_out, c_in, c_noise : Tensors shaped like ``sigma``
    """
    total = sigma.square() + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / total.sqrt()
    c_in = total.rsqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """EDM denoiser D(x; sigma) = c_skip x + c_out F_theta(c_in x; c_noise) (EDM eq. 7).

    Parameters
    ----------
    img_resolution : int
    img_channels : int
    label_dim : int
        Number of classes; 0 for an unconditional model.
    arch : {"ddpmpp", "ncsnpp"}
        Backbone preset (EDM train.py CIFAR-10: 128 channels, mult [2, 2, 2], 4 blocks, attention
        at 16x16, dropout 0.13). "ddpmpp" is EDM's VP network, "ncsnpp" its VE network (used by
        EDM-AOT, and the default).
    augment_dim : int
        Augmentation-label length (9 for EDM's augment pipe, 0 without augmentation).
    sigma_data : float
        Data standard deviation assumed by the preconditioning.
    **unet_kwargs
        Overrides of any SongUNet keyword (e.g. ``model_channels=16, channel_mult=[1, 2]``).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        arch: str = NETWORK_DEFAULTS.arch,
        augment_dim: int = 9,
        sigma_data: float = 0.5,
        **unet_kwargs,
    ):
        super().__init__()
        check_choice("arch", arch, ARCHS)
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        for name, value in (("label_dim", label_dim), ("augment_dim", augment_dim)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.sigma_data = sigma_data
        self.model = SongUNet(
            img_resolution,
            img_channels,
            img_channels,
            label_dim=label_dim,
            augment_dim=augment_dim,
            **{**ARCH_PRESETS[arch], **unet_kwargs},
        )

    def _check_inputs(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape [N, {', '.join(map(str, expected))}], got {tuple(x.shape)}"
            )
        if sigma.numel() != 1 and tuple(sigma.shape) != (x.shape[0],):
            raise ValueError(
                f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(sigma.shape)}"
            )

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise ``x`` at noise level ``sigma``.

        Preconditioning runs in float32; the backbone may run under a caller's autocast, and its
        output is cast back, so the result is always float32.

        Parameters
        ----------
        x : Tensor [N, C, R, R]
            Noisy images y + sigma * n.
        sigma : Tensor [] or [N], or float
            Noise level per image (> 0).
        class_labels : Tensor [N, label_dim] or None
            One-hot floats. None for a conditional model means all-zero labels (the "no class"
            input that label dropout trains).
        augment_labels : Tensor [N, augment_dim] or None
            None means zeros (no augmentation), as at sampling time.

        Returns
        -------
        Tensor [N, C, R, R], float32
        """
        sigma = torch.as_tensor(sigma, device=x.device)
        self._check_inputs(x, sigma)
        n = x.shape[0]
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1).expand(n)
        if self.label_dim and class_labels is None:
            class_labels = x.new_zeros(n, self.label_dim)
        if class_labels is not None:
            class_labels = class_labels.to(torch.float32)
        if augment_labels is not None:
            augment_labels = augment_labels.to(torch.float32)
        c_skip, c_out, c_in, c_noise = (
            c.reshape(-1, 1, 1, 1) for c in preconditioning(sigma, self.sigma_data)
        )
        f_x = self.model(c_in * x, c_noise.flatten(), class_labels, augment_labels)
        return c_skip * x + c_out * f_x.to(torch.float32)
