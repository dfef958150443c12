"""EDM-format network snapshot pickles for tests, written from the format description
(../shared/reference/edm-formats.md; docs/method-notes.md b.8), not from EDM's code.

A snapshot is ``dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)`` at pickle
protocol 4. Every torch module is a persistent object: ``_reconstruct_persistent_obj(meta)`` with
``meta = {type, version, module_src, class_name, state}``, ``state`` the instance ``__dict__``;
SongUNet's ``enc``/``dec`` are ``torch.nn.ModuleDict`` objects (NEWOBJ + BUILD); tensors are
``_rebuild_tensor_v2(_load_from_bytes(legacy torch.save of the storage), ...)`` inside
``_rebuild_parameter``; UNetBlock's ``skip_scale`` is a numpy float64 scalar.

:func:`write_snapshot` lays the tensors of one of this project's ``EDMPrecond`` networks out in
EDM's module tree (names such as ``model.enc.8x8_block0.conv0.weight``), walking the project's
modules, so a test can compare an imported network with the network the tensors came from.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from builders import randomise_parameters

from aot_model.networks import EDMPrecond

NETWORKS_SRC = "# training/networks.py of an EDM release (stand-in text)\n"
LOSS_SRC = "# training/loss.py (stand-in text)\n"
AUGMENT_SRC = "# training/augment.py (stand-in text)\n"
HOOKS = (
    "_backward_pre_hooks",
    "_backward_hooks",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class Global:
    """A global written by name (STACK_GLOBAL); never imported while writing."""

    _interned: ClassVar[dict] = {}

    def __new__(cls, module: str, name: str):
        key = (module, name)
        if key not in cls._interned:
            obj = super().__new__(cls)
            obj.module, obj.name = key
            cls._interned[key] = obj
        return cls._interned[key]


class Reduce:
    """``func(*args)`` in the pickle (REDUCE), optionally followed by BUILD with ``state``."""

    def __init__(self, func: Global, args: tuple, state=None):
        self.func, self.args, self.state = func, args, state


class NewObj:
    """``cls.__new__(cls)`` (NEWOBJ) then BUILD with ``state``: how a ModuleDict is pickled."""

    def __init__(self, cls: Global, state: dict):
        self.cls, self.state = cls, state


class _Writer(pickle._Pickler):
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global | Reduce | NewObj):
            memo = self.memo.get(id(obj))
            if memo is not None:
                self.write(self.get(memo[0]))
                return
            if isinstance(obj, Global):
                self.save(obj.module)
                self.save(obj.name)
                self.write(pickle.STACK_GLOBAL)
            elif isinstance(obj, Reduce):
                self.save(obj.func)
                self.save(obj.args)
                self.write(pickle.REDUCE)
            else:
                self.save(obj.cls)
                self.save(())
                self.write(pickle.NEWOBJ)
            self.memoize(obj)
            if not isinstance(obj, Global) and obj.state is not None:
                self.save(obj.state)
                self.write(pickle.BUILD)
            return
        super().save(obj, save_persistent_id)


PERSISTENT = Global("torch_utils.persistence", "_reconstruct_persistent_obj")
REBUILD_TENSOR = Global("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = Global("torch._utils", "_rebuild_parameter")
LOAD_FROM_BYTES = Global("torch.storage", "_load_from_bytes")
MODULE_DICT = Global("torch.nn.modules.container", "ModuleDict")


def float64(value: float, numpy_module: str = "numpy._core.multiarray") -> Reduce:
    """A numpy float64 scalar as numpy pickles it (``scalar(dtype('f8'), 8 bytes)``)."""
    return Reduce(Global(numpy_module, "scalar"), (np.dtype("f8"), np.float64(value).tobytes()))


def tensor(t: torch.Tensor, parameter: bool = True) -> Reduce:
    buffer = io.BytesIO()
    storage = t.detach().contiguous().clone().untyped_storage()
    typed = torch.TypedStorage(wrap_storage=storage, dtype=t.dtype, _internal=True)
    torch.save(typed, buffer, _use_new_zipfile_serialization=False)  # the legacy storage record
    stored = Reduce(LOAD_FROM_BYTES, (buffer.getvalue(),))
    stride = tuple(t.contiguous().stride())
    rebuilt = Reduce(REBUILD_TENSOR, (stored, 0, tuple(t.shape), stride, False, OrderedDict()))
    return Reduce(REBUILD_PARAMETER, (rebuilt, True, OrderedDict())) if parameter else rebuilt


class Writer:
    """Builds persistent objects whose ``module_src`` is one string per module file."""

    def __init__(self, networks_src: str = NETWORKS_SRC, numpy_module="numpy._core.multiarray"):
        self.networks_src, self.numpy_module = networks_src, numpy_module

    def module(
        self, class_name, params=(), buffers=(), children=(), attrs=None, kwargs=None, src=None
    ):
        state = {
            "training": False,
            "_parameters": OrderedDict((k, None if v is None else tensor(v)) for k, v in params),
            "_buffers": OrderedDict(
                (k, None if v is None else tensor(v, parameter=False)) for k, v in buffers
            ),
            "_non_persistent_buffers_set": set(),
            "_modules": OrderedDict(children),
            **{hook: OrderedDict() for hook in HOOKS},
            "_is_full_backward_hook": None,
            **(attrs or {}),
            "_init_args": (),
            "_init_kwargs": dict(kwargs or {}),
        }
        meta = {
            "type": "class",
            "version": 6,
            "module_src": self.networks_src if src is None else src,
            "class_name": class_name,
            "state": state,
        }
        return Reduce(PERSISTENT, (meta,))

    def conv(self, conv, fir=None, fused=False):
        """EDM's Conv2d from an nn.Conv2d (or a (Resample, Conv2d) pair)."""
        if isinstance(conv, torch.nn.Sequential):
            resample, conv = conv
            taps = torch.as_tensor(fir, dtype=torch.float32)
            filt = (taps.ger(taps) / taps.sum().square())[None, None]
            up, down = resample.upsample, not resample.upsample
        else:
            resample, filt, up, down = None, None, False, False
        attrs = {
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "up": up,
            "down": down,
            "fused_resample": fused,
        }
        return self.module(
            "Conv2d",
            params=[("weight", conv.weight), ("bias", conv.bias)],
            buffers=[("resample_filter", filt)],
            attrs=attrs,
        )

    def linear(self, linear):
        return self.module(
            "Linear",
            params=[("weight", linear.weight), ("bias", linear.bias)],
            attrs={"in_features": linear.in_features, "out_features": linear.out_features},
        )

    def norm(self, norm):
        return self.module(
            "GroupNorm",
            params=[("weight", norm.weight), ("bias", norm.bias)],
            attrs={"num_groups": norm.num_groups, "eps": norm.eps},
        )

    def block(self, block, fir):
        attention = not isinstance(block.attention, torch.nn.Identity)
        children = [
            ("norm0", self.norm(block.norm0)),
            ("conv0", self.conv(block.conv0, fir)),
            ("affine", self.linear(block.affine)),
            ("norm1", self.norm(block.norm1)),
            ("conv1", self.conv(block.conv1)),
            ("skip", None),
        ]
        if not isinstance(block.skip, torch.nn.Identity):
            children[-1] = ("skip", self.conv(block.skip, fir))
        if attention:
            children += [
                ("norm2", self.norm(block.attention.norm)),
                ("qkv", self.conv(block.attention.qkv)),
                ("proj", self.conv(block.attention.proj)),
            ]
        attrs = {
            "in_channels": block.norm0.num_channels,
            "out_channels": block.conv1.out_channels,
            "num_heads": 1 if attention else 0,
            "dropout": block.dropout.p,
            "skip_scale": float64(math.sqrt(0.5), self.numpy_module),
            "adaptive_scale": False,
        }
        return self.module("UNetBlock", children=children, attrs=attrs)

    def songunet(self, unet, config: dict, kwargs: dict):
        """SongUNet in EDM's layout: map_*, then ``enc`` and ``dec`` ModuleDicts named by
        resolution (``32x32_conv``, ``16x16_down``, ``16x16_aux_residual``, ``8x8_block0``,
        ``8x8_in0``, ``16x16_up``, ``32x32_aux_norm``, ``32x32_aux_conv``)."""
        fir, res0 = config["resample_filter"], unet.img_resolution
        levels = len(unet.enc_blocks)
        noise = unet.map_noise
        if config["embedding_type"] == "fourier":
            map_noise = self.module("FourierEmbedding", buffers=[("freqs", noise.freqs)])
        else:
            attrs = {"num_channels": 2 * len(noise.freqs), "max_positions": 10000, "endpoint": True}
            map_noise = self.module("PositionalEmbedding", attrs=attrs)
        enc = []
        for level in range(levels):
            res = res0 >> level
            if level == 0:
                enc.append((f"{res}x{res}_conv", self.conv(unet.enc_in)))
            else:
                enc.append((f"{res}x{res}_down", self.block(unet.enc_down[level - 1], fir)))
                if unet.residual_encoder:
                    aux = unet.enc_aux[level - 1]
                    pair = torch.nn.Sequential(aux[1], aux[0])  # EDM fuses conv then filter
                    enc.append((f"{res}x{res}_aux_residual", self.conv(pair, fir, fused=True)))
            for idx, block in enumerate(unet.enc_blocks[level]):
                enc.append((f"{res}x{res}_block{idx}", self.block(block, fir)))
        dec = []
        for k, level in enumerate(reversed(range(levels))):
            res = res0 >> level
            if k == 0:
                dec.append((f"{res}x{res}_in0", self.block(unet.dec_mid[0], fir)))
                dec.append((f"{res}x{res}_in1", self.block(unet.dec_mid[1], fir)))
            else:
                dec.append((f"{res}x{res}_up", self.block(unet.dec_up[k - 1], fir)))
            for idx, block in enumerate(unet.dec_blocks[k]):
                dec.append((f"{res}x{res}_block{idx}", self.block(block, fir)))
        dec.append((f"{res0}x{res0}_aux_norm", self.norm(unet.out_norm)))
        dec.append((f"{res0}x{res0}_aux_conv", self.conv(unet.out_conv)))
        children = [
            ("map_noise", map_noise),
            ("map_label", None if unet.map_label is None else self.linear(unet.map_label)),
            ("map_augment", None),
            ("map_layer0", self.linear(unet.map_layer0)),
            ("map_layer1", self.linear(unet.map_layer1)),
            ("enc", NewObj(MODULE_DICT, self._module_dict(enc))),
            ("dec", NewObj(MODULE_DICT, self._module_dict(dec))),
        ]
        if unet.map_augment is not None:
            weight = unet.map_augment.weight
            attrs = {"in_features": unet.augment_dim, "out_features": len(weight)}
            linear = self.module("Linear", params=[("weight", weight), ("bias", None)], attrs=attrs)
            children[2] = ("map_augment", linear)
        attrs = {"label_dropout": unet.label_dropout}
        return self.module("SongUNet", children=children, attrs=attrs, kwargs=kwargs)

    @staticmethod
    def _module_dict(children) -> dict:
        state = {
            "training": False,
            "_parameters": OrderedDict(),
            "_buffers": OrderedDict(),
            "_non_persistent_buffers_set": set(),
            "_modules": OrderedDict(children),
        }
        state.update({hook: OrderedDict() for hook in HOOKS})
        return state


# A tiny SongUNet (8x8, two levels). Only what EDM's train.py would pass is recorded; ``dropout``
# and ``channel_mult_emb`` are left to EDM's defaults (0.10 and 4).
TINY = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}
ARCH_KWARGS = {
    "ddpmpp": {
        "embedding_type": "positional",
        "encoder_type": "standard",
        "decoder_type": "standard",
        "channel_mult_noise": 1,
        "resample_filter": [1, 1],
    },
    "ncsnpp": {
        "embedding_type": "fourier",
        "encoder_type": "residual",
        "decoder_type": "standard",
        "channel_mult_noise": 2,
        "resample_filter": [1, 3, 3, 1],
    },
}


def tiny_network(arch: str, label_dim: int = 0, augment_dim: int = 9, seed: int = 0, **unet):
    """A project EDMPrecond in EDM's configuration with every tensor random (so each matters to
    the output; NCSN++'s Fourier frequencies redrawn, so they differ from the project's seeded
    ones) and its configuration. ``unet`` overrides TINY."""
    config = {**TINY, **ARCH_KWARGS[arch], "dropout": 0.10, "channel_mult_emb": 4, **unet}
    net_kwargs = {k: v for k, v in config.items() if k != "decoder_type"}
    net = EDMPrecond(8, 3, label_dim=label_dim, arch=arch, augment_dim=augment_dim, **net_kwargs)
    return randomise_parameters(net, seed).eval(), config


def write_snapshot(
    path: str | Path,
    net: EDMPrecond,
    config: dict,
    *,
    record: dict | None = None,
    entries: dict | None = None,
    writer: Writer | None = None,
    precond: str = "EDMPrecond",
    backbone: str = "SongUNet",
) -> Path:
    """Write ``net`` as an EDM ``network-snapshot-*.pkl``. ``record``: the SongUNet arguments to
    record (default: what train.py passes for ``config``); ``entries`` replace or add top-level
    entries (``None`` drops one)."""
    writer = writer or Writer()
    unet = net.model
    if record is None:
        record = {k: config[k] for k in (*ARCH_KWARGS["ddpmpp"], *TINY)}
        if net.augment_dim:
            record["augment_dim"] = net.augment_dim
    unet_kwargs = {
        "img_resolution": unet.img_resolution,
        "in_channels": net.img_channels,
        "out_channels": net.img_channels,
        "label_dim": net.label_dim,
        **record,
    }
    precond_kwargs = {
        "img_resolution": net.img_resolution,
        "img_channels": net.img_channels,
        "label_dim": net.label_dim,
        "model_type": backbone,
        "use_fp16": False,
        **record,
    }
    ema = writer.module(
        precond,
        children=[("model", writer.songunet(unet, config, unet_kwargs))],
        attrs={
            "img_resolution": net.img_resolution,
            "img_channels": net.img_channels,
            "label_dim": net.label_dim,
            "use_fp16": False,
            "sigma_min": 0,
            "sigma_max": float("inf"),
            "sigma_data": 0.5,
        },
        kwargs=precond_kwargs,
    )
    if backbone != "SongUNet":
        ema.args[0]["state"]["_modules"]["model"].args[0]["class_name"] = backbone
    snapshot = {
        "ema": ema,
        "loss_fn": writer.module(
            "EDMLoss", attrs={"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}, src=LOSS_SRC
        ),
        "augment_pipe": writer.module(
            "AugmentPipe", attrs={"p": 0.12, "xflip": 1e8}, src=AUGMENT_SRC
        ),
        "dataset_kwargs": {
            "class_name": "training.dataset.ImageFolderDataset",
            "path": "datasets/cifar10-32x32.zip",
            "use_labels": bool(net.label_dim),
            "xflip": False,
            "cache": True,
            "resolution": 32,
            "max_size": 50000,
        },
    }
    for key, value in (entries or {}).items():
        if value is None:
            snapshot.pop(key, None)
        else:
            snapshot[key] = value
    path = Path(path)
    buffer = io.BytesIO()
    _Writer(buffer, protocol=4).dump(snapshot)
    path.write_bytes(buffer.getvalue())
    return path
