"""Import NVlabs/edm network snapshots (``network-snapshot-*.pkl``) without running their code.

EDM's pickles embed the Python source of every class they hold (``torch_utils/persistence.py``);
``pickle.load`` executes it. Here the pickle is read by an unpickler that resolves only the
globals such a snapshot needs (method-notes b.8) and keeps every persistent object as data
(:class:`Persistent`): class name, embedded source and instance ``__dict__``. Nothing from the file
is ever executed or imported.

The network's configuration is rebuilt from the constructor arguments EDM recorded (only those
actually passed) filled with EDM's own SongUNet defaults (:data:`EDM_SONGUNET_DEFAULTS`, which
differ from this project's), cross-checked against every tensor's shape; tensors are copied by an
explicit name mapping (:func:`tensor_names`) into :class:`aot_model.networks.EDMPrecond`; fixed
resampling filters are checked, not copied; NCSN++'s random Fourier frequencies are copied.
:func:`import_edm` writes a run directory whose one checkpoint every sampler of this project
reads unchanged, marked as imported so training refuses to resume from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from aot_model.checkpoints import (
    FORMAT_VERSION,
    STATS_FILE,
    checkpoint_path,
    find_checkpoints,
    save_checkpoint,
)
from aot_model.files import atomic_write, file_digest
from aot_model.networks import ARCH_PRESETS, EDMPrecond

IMPORT_FILE = "import.json"
ZIP_MAGIC = b"PK\x03\x04"

# EDM training/networks.py, SongUNet.__init__'s keyword defaults: a released snapshot records only
# the arguments train.py passed, so these fill the rest (method-notes b.8). They are EDM's, not this
# project's (channel_mult [1, 2, 2, 2] and dropout 0.10 differ from networks.SongUNet).
EDM_SONGUNET_DEFAULTS = {
    "label_dim": 0,
    "augment_dim": 0,
    "model_channels": 128,
    "channel_mult": [1, 2, 2, 2],
    "channel_mult_emb": 4,
    "num_blocks": 4,
    "attn_resolutions": [16],
    "dropout": 0.10,
    "label_dropout": 0,
    "embedding_type": "positional",
    "channel_mult_noise": 1,
    "encoder_type": "standard",
    "decoder_type": "standard",
    "resample_filter": [1, 1],
}
# SongUNet.__init__'s parameter order, for arguments recorded positionally (_init_args).
EDM_SONGUNET_ORDER = ("img_resolution", "in_channels", "out_channels", *EDM_SONGUNET_DEFAULTS)
ARCH_NAMES = {"ddpmpp": "DDPM++", "ncsnpp": "NCSN++"}

# SHA-256 -> release of module sources known to be the public releases' embedded text. Empty until
# checked on the official downloads (none could be fetched where this was written): add the
# sha256s import.json records for them. Until then every embedded source is reported unknown,
# with a warning; it is recorded and never run either way.
KNOWN_SOURCES: dict[str, str] = {}


class EDMImportError(ValueError):
    """The file cannot be imported; the message is one line naming the file and the reason."""


# ------------------------------------------------------------------------------------------------
# The restricted unpickler.


@dataclass
class Persistent:
    """A ``torch_utils.persistence`` object kept as data: never instantiated, never executed."""

    class_name: str
    module_src: str
    state: dict


@dataclass
class ModuleDict:
    """A pickled ``torch.nn.ModuleDict`` (SongUNet's ``enc`` and ``dec``): its ``__dict__``."""

    state: dict = field(default_factory=dict)

    def __post_init__(self):  # REDUCE
        self.__setstate__(self.state)

    def __setstate__(self, state):  # BUILD
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("a ModuleDict's state is not a dict")
        self.state = state


def _persistent(meta) -> Persistent:
    """Stands in for ``_reconstruct_persistent_obj``: records ``meta``, runs nothing."""
    fields = (("class_name", str), ("module_src", str), ("state", dict))
    ok = isinstance(meta, dict) and meta.get("type") == "class"
    if not ok or not all(isinstance(meta.get(k), t) for k, t in fields):
        raise pickle.UnpicklingError("a persistent object's metadata is not EDM's class record")
    return Persistent(meta["class_name"], meta["module_src"], meta["state"])


def _parameter(tensor, requires_grad=False, hooks=None):
    """``torch._utils._rebuild_parameter`` as data: the tensor itself."""
    if not isinstance(tensor, torch.Tensor):
        raise pickle.UnpicklingError("a parameter does not hold a tensor")
    return tensor


def _tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` on a storage read by :func:`_storage` only (torch
    checks the view against the storage's bounds)."""
    if not isinstance(storage, torch.TypedStorage):
        raise pickle.UnpicklingError("a tensor's storage is not a storage")
    return torch._utils._rebuild_tensor_v2(
        storage, offset, tuple(size), tuple(stride), False, OrderedDict()
    )


def _storage(data) -> torch.TypedStorage:
    """``torch.storage._load_from_bytes``: one legacy ``torch.save`` of a storage, read by torch's
    own restricted loader (``weights_only=True``)."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a storage is not stored as bytes")
    storage = torch.load(io.BytesIO(data), weights_only=True)
    if not isinstance(storage, torch.TypedStorage):
        raise pickle.UnpicklingError("a storage record holds something else")
    return storage


def _scalar(dtype, data) -> float | int:
    """``numpy...multiarray.scalar`` for numeric dtypes only, as a Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDict,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch.storage", "_load_from_bytes"): _storage,
    ("numpy.core.multiarray", "scalar"): _scalar,  # numpy 1.x name
    ("numpy._core.multiarray", "scalar"): _scalar,  # numpy 2 name
    ("numpy", "dtype"): np.dtype,
}


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something a network snapshot never needs; the message says what."""


class _SnapshotUnpickler(pickle._Unpickler):
    """Resolves only :data:`_ALLOWED`; any other global stops the read before it is looked up.

    The Python unpickler, so that BUILD (``__setstate__`` or ``__dict__`` update of the object on
    the stack) can be limited to what a snapshot uses it for: a ModuleDict's and a numpy dtype's
    state (method-notes b.8).
    """

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise _Refused(
                f"the pickle names the global {module}.{name}, which an EDM network snapshot "
                "does not need"
            )
        return _ALLOWED[module, name]

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("a persistent id, which network snapshots never hold")

    def load_build(self):
        target = self.stack[-2] if len(self.stack) > 1 else None
        if not isinstance(target, ModuleDict | np.dtype):
            raise _Refused(
                f"the pickle sets the state of a {type(target).__name__}, which an EDM network "
                "snapshot never does"
            )
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def read_snapshot(path: str | Path) -> dict:
    """The top-level dict of an EDM snapshot pickle, persistent objects kept as data; EDMImportError
    for a missing, empty, damaged or zip file, a global outside :data:`_ALLOWED` or a non-dict."""
    path = Path(path)
    if not path.is_file():
        raise EDMImportError(f"{path}: not found")
    with open(path, "rb") as f:
        head = f.read(4)
        if not head:
            raise EDMImportError(f"{path}: the file is empty")
        if head == ZIP_MAGIC:
            raise EDMImportError(
                f"{path}: a zip archive (a torch.save file such as EDM's training-state-*.pt), "
                "not an EDM network snapshot pickle (network-snapshot-*.pkl)"
            )
        f.seek(0)
        try:
            data = _SnapshotUnpickler(f).load()
        except _Refused as error:
            raise EDMImportError(f"{path}: refused: {error}; nothing in it was run") from None
        except Exception as error:  # a damaged pickle can make the unpickler raise anything
            raise EDMImportError(
                f"{path}: truncated or not a pickle ({type(error).__name__}: {error})"
            ) from None
    if not isinstance(data, dict):
        raise EDMImportError(f"{path}: the pickle holds a {type(data).__name__}, not EDM's dict")
    return data


# ------------------------------------------------------------------------------------------------
# Configuration and tensors.


def _kwargs(obj: Persistent) -> dict:
    """The constructor arguments a persistent object recorded, positional ones by name."""
    args = obj.state.get("_init_args", ())
    kwargs = dict(obj.state.get("_init_kwargs", {}))
    if obj.class_name == "SongUNet":
        kwargs.update(zip(EDM_SONGUNET_ORDER, args, strict=False))
    return kwargs


def _children(node) -> dict:
    modules = node.state.get("_modules", {})
    return {k: v for k, v in modules.items() if v is not None}


def _walk(node, prefix: str = ""):
    """(dotted prefix: "" or "name.", module) of ``node`` and every module under it."""
    yield prefix, node
    for name, child in _children(node).items():
        if not isinstance(child, Persistent | ModuleDict):
            raise TypeError(f"module {prefix + name} is a {type(child).__name__}")
        yield from _walk(child, f"{prefix}{name}.")


def flatten(node) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under a persistent module tree, by dotted name."""
    out = {}
    for prefix, module in _walk(node):
        for group in ("_parameters", "_buffers"):
            for key, tensor in module.state.get(group, {}).items():
                if tensor is not None:
                    out[prefix + key] = tensor
    return out


# Attributes SongUNet's code sets that this project's network hard-codes (networks.py: GroupNorm
# eps 1e-6, at most 32 groups of at least 4 channels; residual sum scaled by sqrt(0.5) with the
# embedding added as a bias; one attention head; the endpoint positional embedding). A snapshot
# written by other code (its source is never run, so never trusted) must agree.
_FIXED = {
    "GroupNorm": lambda m: {"eps": 1e-6},
    "UNetBlock": lambda m: {
        "skip_scale": math.sqrt(0.5),
        "adaptive_scale": False,
        "num_heads": 1 if "norm2" in _children(m) else 0,
    },
    "PositionalEmbedding": lambda m: {"endpoint": True, "max_positions": 10000},
}


def _check_fixed(path: Path, ema: Persistent) -> None:
    for name, module in _walk(ema):  # name: "" or "model.enc.8x8_block0.norm0."
        want = _FIXED.get(getattr(module, "class_name", None), lambda m: {})(module)
        for attr, value in want.items():
            got = module.state.get(attr)
            same = isinstance(got, bool | int | float) and math.isclose(got, value, rel_tol=1e-9)
            if not same or isinstance(value, bool) != isinstance(got, bool):
                raise EDMImportError(
                    f"{path}: {name}{attr} is {got!r}, where this project's SongUNet has {value!r}"
                )


def tensor_names(config: dict) -> tuple[dict[str, str], list[str]]:
    """(EDM tensor name -> this project's state-dict name, EDM's fixed resampling-filter names)
    for an EDMPrecond with SongUNet ``config`` (EDM's module layout, method-notes b.8)."""
    mapping, filters = {}, []
    res0 = config["img_resolution"]
    mults, blocks = config["channel_mult"], config["num_blocks"]

    def param(edm: str, ours: str, bias: bool = True) -> None:
        mapping[f"model.{edm}.weight"] = f"model.{ours}.weight"
        if bias:
            mapping[f"model.{edm}.bias"] = f"model.{ours}.bias"

    def block(edm: str, ours: str, direction=None, skip=False, attention=False) -> None:
        for name in ("norm0", "affine", "norm1", "conv1"):
            param(f"{edm}.{name}", f"{ours}.{name}")
        for name in ("conv0", "skip") if skip else ("conv0",):
            param(f"{edm}.{name}", f"{ours}.{name}" + (".1" if direction else ""))
            if direction:
                filters.append(f"model.{edm}.{name}.resample_filter")
        if attention:
            for edm_name, our_name in (("norm2", "norm"), ("qkv", "qkv"), ("proj", "proj")):
                param(f"{edm}.{edm_name}", f"{ours}.attention.{our_name}")

    if config["embedding_type"] == "fourier":
        mapping["model.map_noise.freqs"] = "model.map_noise.freqs"
    if config["label_dim"]:
        param("map_label", "map_label")
    if config["augment_dim"]:
        param("map_augment", "map_augment", bias=False)
    param("map_layer0", "map_layer0")
    param("map_layer1", "map_layer1")

    width, attn = config["model_channels"], set(config["attn_resolutions"])
    for level, mult in enumerate(mults):
        res = res0 >> level
        if level == 0:
            param(f"enc.{res}x{res}_conv", "enc_in")
        else:
            block(f"enc.{res}x{res}_down", f"enc_down.{level - 1}", "down", skip=True)
            if config["encoder_type"] == "residual":
                param(f"enc.{res}x{res}_aux_residual", f"enc_aux.{level - 1}.0")
                filters.append(f"model.enc.{res}x{res}_aux_residual.resample_filter")
        for idx in range(blocks):
            out = config["model_channels"] * mult
            block(f"enc.{res}x{res}_block{idx}", f"enc_blocks.{level}.{idx}",
                  skip=width != out, attention=res in attn)  # fmt: skip
            width = out
    for k, level in enumerate(reversed(range(len(mults)))):
        res = res0 >> level
        if k == 0:
            block(f"dec.{res}x{res}_in0", "dec_mid.0", attention=True)
            block(f"dec.{res}x{res}_in1", "dec_mid.1")
        else:
            block(f"dec.{res}x{res}_up", f"dec_up.{k - 1}", "up", skip=True)
        for idx in range(blocks + 1):  # each eats an encoder skip: in != out, so a 1x1 skip
            block(f"dec.{res}x{res}_block{idx}", f"dec_blocks.{k}.{idx}", skip=True,
                  attention=idx == blocks and res in attn)  # fmt: skip
    param(f"dec.{res0}x{res0}_aux_norm", "out_norm")
    param(f"dec.{res0}x{res0}_aux_conv", "out_conv")
    return mapping, filters


# ------------------------------------------------------------------------------------------------
# The import.


@dataclass
class EDMSnapshot:
    """What an EDM snapshot holds, read as data."""

    network_kwargs: dict  # EDMPrecond(**network_kwargs) of this project
    state_dict: dict[str, torch.Tensor]  # its tensors, by this project's names
    architecture: str  # "DDPM++", "NCSN++" or "SongUNet" (another combination)
    recorded: dict  # {"EDMPrecond": kwargs, "SongUNet": kwargs} as recorded
    attributes: dict  # EDMPrecond's plain attributes (sigma_data, use_fp16, ...)
    sources: list[dict]  # one per embedded module source: classes, sha256, known
    other: dict  # loss_fn, augment_pipe, dataset_kwargs and any other entry, summarised


def _summary(value):
    """A JSON-able account of a non-network entry (persistent objects by class and plain
    attributes; no source text)."""
    if isinstance(value, Persistent):
        attrs = {
            k: _summary(v)
            for k, v in value.state.items()
            if not k.startswith("_") and k != "training"
        }
        return {"class": value.class_name, **attrs}
    if isinstance(value, dict):
        return {str(k): _summary(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_summary(v) for v in value]
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return type(value).__name__


def _sources(data: dict) -> list[dict]:
    """One entry per distinct embedded module source: its SHA-256, the classes it defines here
    and whether it is a known release text."""
    found: dict[str, set[str]] = {}  # sha256 -> class names

    def walk(value) -> None:
        if isinstance(value, Persistent):
            digest = hashlib.sha256(value.module_src.encode()).hexdigest()
            found.setdefault(digest, set()).add(value.class_name)
        if isinstance(value, Persistent | ModuleDict):
            value = value.state
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list | tuple):
            for item in value:
                walk(item)

    walk(data)
    return [
        {
            "sha256": sha,
            "classes": sorted(classes),
            "known": sha in KNOWN_SOURCES,
            "release": KNOWN_SOURCES.get(sha),
        }
        for sha, classes in found.items()
    ]


def _network_config(path: Path, ema: Persistent) -> tuple[dict, dict, str]:
    """(config for tensor_names, this project's EDMPrecond kwargs, architecture name)."""
    unet = _children(ema).get("model")
    if not isinstance(unet, Persistent) or unet.class_name != "SongUNet":
        got = unet.class_name if isinstance(unet, Persistent) else type(unet).__name__
        raise EDMImportError(
            f"{path}: the backbone is {got}, not SongUNet (EDM's ADM/DhariwalUNet ImageNet model "
            "is not supported)"
        )
    recorded = _kwargs(unet)
    unknown = sorted(set(recorded) - set(EDM_SONGUNET_ORDER))
    if unknown:
        raise EDMImportError(f"{path}: SongUNet records arguments EDM does not have: {unknown}")
    config = {**EDM_SONGUNET_DEFAULTS, **recorded}
    attrs = ema.state
    channels = attrs.get("img_channels")
    if config.get("in_channels") != channels or config.get("out_channels") != channels:
        raise EDMImportError(
            f"{path}: SongUNet maps {config.get('in_channels')} to {config.get('out_channels')} "
            f"channels, EDMPrecond has img_channels {channels}"
        )
    for key in ("img_resolution", "label_dim"):
        if config.get(key) != attrs.get(key):
            raise EDMImportError(
                f"{path}: SongUNet has {key} {config.get(key)}, EDMPrecond {attrs.get(key)}"
            )
    arch = _architecture(config)
    kwargs = {
        "img_resolution": config["img_resolution"],
        "img_channels": channels,
        "label_dim": config["label_dim"],
        "arch": arch or "ddpmpp",
        "augment_dim": config["augment_dim"],
        "sigma_data": float(attrs.get("sigma_data", 0.5)),
        # label_dim and augment_dim again: same values, same places.
        **{k: _plain(config[k]) for k in EDM_SONGUNET_DEFAULTS},
    }
    return config, kwargs, ARCH_NAMES[arch] if arch else "SongUNet"


def _plain(value):
    return list(value) if isinstance(value, list | tuple) else value


def _architecture(config: dict) -> str | None:
    """ "ddpmpp" or "ncsnpp" when ``config`` is that preset in every argument where they differ
    (those NCSN++ sets; DDPM++ keeps SongUNet's defaults, EDM train.py)."""
    for arch, preset in ARCH_PRESETS.items():
        want = {**EDM_SONGUNET_DEFAULTS, **preset}
        if all(_plain(config[k]) == _plain(want[k]) for k in ARCH_PRESETS["ncsnpp"]):
            return arch
    return None


def load_snapshot(path: str | Path) -> EDMSnapshot:
    """Read an EDM snapshot pickle into this project's network configuration and tensors;
    EDMImportError (one line: the file and the reason) for anything that is not an
    EDMPrecond(SongUNet) snapshot with every tensor present at its shape."""
    path = Path(path)
    data = read_snapshot(path)
    try:
        return _parse(path, data)
    except (AttributeError, TypeError, KeyError, IndexError) as error:
        # A pickle of the allowed types in another arrangement (a dict where a module should be).
        raise EDMImportError(
            f"{path}: not laid out as an EDM network snapshot ({type(error).__name__}: {error})"
        ) from None


def _parse(path: Path, data: dict) -> EDMSnapshot:
    ema = data.get("ema")
    if ema is None:
        raise EDMImportError(f"{path}: no 'ema' entry (keys: {sorted(map(str, data))})")
    if not isinstance(ema, Persistent) or ema.class_name != "EDMPrecond":
        got = ema.class_name if isinstance(ema, Persistent) else type(ema).__name__
        raise EDMImportError(
            f"{path}: the preconditioner is {got}, not EDMPrecond (EDM's VP, VE and iDDPM "
            "baselines are not supported)"
        )
    config, kwargs, architecture = _network_config(path, ema)
    try:
        with torch.device("meta"):  # shapes only: no initialisation drawn or stored
            shapes = {k: tuple(v.shape) for k, v in EDMPrecond(**kwargs).state_dict().items()}
    except ValueError as error:
        raise EDMImportError(f"{path}: unsupported network configuration ({error})") from None
    _check_fixed(path, ema)
    mapping, filters = tensor_names(config)
    tensors = flatten(ema)
    state_dict = {}
    for edm, ours in mapping.items():
        if edm not in tensors:
            raise EDMImportError(f"{path}: tensor {edm} is missing")
        if tuple(tensors[edm].shape) != shapes[ours]:
            raise EDMImportError(
                f"{path}: tensor {edm} has shape {list(tensors[edm].shape)}, the recorded "
                f"configuration needs {list(shapes[ours])}"
            )
        state_dict[ours] = tensors[edm].detach().to(torch.float32).clone()
    # EDM's resample_filter buffer (networks.Conv2d): the taps' outer product over their squared
    # sum, [1, 1, k, k]; the x4 of upsampling is applied in forward, not stored.
    taps = torch.as_tensor(config["resample_filter"], dtype=torch.float32)
    expected = (taps.ger(taps) / taps.sum().square())[None, None]
    for name in filters:
        got = tensors.get(name)
        if got is None or got.shape != expected.shape or not torch.allclose(got, expected):
            raise EDMImportError(
                f"{path}: fixed filter {name} is not the {config['resample_filter']} filter the "
                "configuration records"
            )
    extra = sorted(set(tensors) - set(mapping) - set(filters))
    if extra:
        raise EDMImportError(
            f"{path}: tensor {extra[0]} is not part of the recorded configuration"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    if set(state_dict) != set(shapes):  # the mapping must fill this project's network exactly
        raise AssertionError(f"tensor_names misses {sorted(set(shapes) - set(state_dict))}")
    attributes = {
        k: _summary(ema.state.get(k))
        for k in ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min",
                  "sigma_max", "sigma_data")
    }  # fmt: skip
    return EDMSnapshot(
        network_kwargs=kwargs,
        state_dict=state_dict,
        architecture=architecture,
        recorded={
            "EDMPrecond": _summary(_kwargs(ema)),
            "SongUNet": _summary(_kwargs(_children(ema)["model"])),
        },
        attributes=attributes,
        sources=_sources(data),
        other={str(k): _summary(v) for k, v in data.items() if k != "ema"},
    )


def holds_run(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` already holds a training or imported run."""
    out_dir = Path(out_dir)
    return bool(find_checkpoints(out_dir)) or any(
        (out_dir / name).exists() for name in (STATS_FILE, IMPORT_FILE)
    )


def import_edm(src: str | Path, out_dir: str | Path, *, name: str | None = None) -> dict:
    """Import an EDM snapshot into run directory ``out_dir``.

    Writes ``training-state-000000000.pt`` (EMA weights as both ``net`` and ``ema``, this
    project's ``network_kwargs``, an ``imported`` record with the source and its SHA-256, which
    makes training refuse to resume from it) and ``import.json`` (source path and SHA-256,
    architecture, recorded constructor arguments, one SHA-256 per embedded source with whether it
    is a known release text, what else the snapshot held). Everything is checked before anything
    is written: a refusal leaves ``out_dir`` as it was. Returns the ``import.json`` contents plus
    ``checkpoint`` (its path).
    """
    src, out_dir = Path(src), Path(out_dir)
    if holds_run(out_dir):
        raise EDMImportError(f"{out_dir}: already holds a run; import into an empty folder")
    snapshot = load_snapshot(src)
    digest = file_digest(src)
    info = {
        "name": name or src.stem,
        "source": str(src),
        "source_sha256": digest,
        "architecture": snapshot.architecture,
        "network_kwargs": snapshot.network_kwargs,
        "recorded_kwargs": snapshot.recorded,
        "precond_attributes": snapshot.attributes,
        "embedded_sources": snapshot.sources,
        "other_entries": snapshot.other,
        "warnings": [
            f"embedded source {s['sha256'][:12]}... ({', '.join(s['classes'])}) is not a known "
            "release text; it was recorded, never run"
            for s in snapshot.sources
            if not s["known"]
        ],
    }
    state = {
        "net": snapshot.state_dict,
        "ema": snapshot.state_dict,
        "optimizer": {},
        "step": 0,
        "cur_nimg": 0,
        "cur_tick": 0,
        "pool": {},
        "rng": {},
        "options": {},
        "network_kwargs": snapshot.network_kwargs,
        "format": FORMAT_VERSION,
        "imported": {"source": str(src), "source_sha256": digest, "tool": "aot import-edm"},
    }
    checkpoint = checkpoint_path(out_dir, 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, state, keep=1)
    info["checkpoint_sha256"] = file_digest(checkpoint)
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    atomic_write(out_dir / IMPORT_FILE, lambda f: f.write(text.encode()))
    return {**info, "checkpoint": str(checkpoint)}
