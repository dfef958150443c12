"""The one schema of ``params.yaml``: every knob of every step, validated before any compute starts.

Each top-level section belongs to one pipeline step (``data`` -> ``aot prepare``, ``train`` ->
``aot train``, ...), so a DVC stage lists exactly the section it reads and ``dvc repro`` reruns
only what changed.
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aot_model.data import CIFAR10_MD5, CIFAR10_URL


class ConfigError(ValueError):
    """``params.yaml`` is invalid; the message names every offending key and its allowed values."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    """Dataset to prepare. ``digits`` is scikit-learn's bundled 8x8 handwritten digits (offline,
    CPU demo); ``cifar10`` is the official CIFAR-10 python tarball, checked against its MD5."""

    dataset: Literal["digits", "cifar10"] = "digits"
    source: str = Field(
        CIFAR10_URL, description="cifar10 only: https URL, local tarball or s3://bucket/key"
    )
    md5: str = Field(
        CIFAR10_MD5, description="cifar10 only: expected tarball MD5 (the official one)"
    )
    split: Literal["train", "test"] = "train"
    resolution: int = Field(16, ge=4, le=256, description="digits only: resized resolution")
    channels: Literal[1, 3] = Field(1, description="digits only: 1 (grey) or 3 (replicated)")


class NetworkParams(Section):
    """SongUNet behind EDM preconditioning (method-notes b.4); paper: ncsnpp 128 [2,2,2] 4 [16]."""

    arch: Literal["ddpmpp", "ncsnpp"] = "ncsnpp"
    cond: bool = False
    model_channels: int = Field(128, ge=1)
    channel_mult: list[int] = Field(default_factory=lambda: [2, 2, 2], min_length=1)
    num_blocks: int = Field(4, ge=1)
    attn_resolutions: list[int] = Field(default_factory=lambda: [16])
    dropout: float = Field(0.13, ge=0.0, lt=1.0)


class AOTParams(Section):
    """Approximated optimal transport pairing (method-notes a.2); on/off is set per variant."""

    pool_size: int = Field(512, ge=1, description="images matched at once, per rank")
    cost: Literal["euclidean", "squared"] = "euclidean"
    solver: Literal["scipy", "lap"] = "scipy"
    scope: Literal["per_rank", "global"] = "per_rank"
    prefetch: bool = True


class TrainParams(Section):
    """Optimisation (method-notes b.5). Durations and cadences are in thousands of images (kimg)."""

    seed: int = Field(0, ge=0)
    duration_kimg: float = Field(200_000, gt=0)
    batch: int = Field(512, ge=1, description="images per optimizer step, all ranks")
    batch_gpu: int | None = Field(
        None, ge=1, description="micro-batch per rank; None = batch / ranks"
    )
    lr: float = Field(1e-3, gt=0)
    lr_rampup_kimg: float = Field(10_000, ge=0)
    ema_halflife_kimg: float = Field(500, gt=0)
    ema_rampup_ratio: float | None = Field(0.05, gt=0)
    augment_p: float = Field(0.12, ge=0, le=1)
    tick_kimg: float = Field(50, gt=0)
    snapshot_ticks: int = Field(50, ge=1)
    keep_snapshots: int = Field(3, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    tf32: bool = False
    aot: AOTParams = AOTParams()

    @model_validator(mode="after")
    def _pool_fits_batches(self) -> TrainParams:
        micro = self.batch_gpu or self.batch
        if self.batch_gpu is not None and self.batch % self.batch_gpu:
            raise ValueError(
                f"batch ({self.batch}) must be a multiple of batch_gpu ({self.batch_gpu})"
            )
        if self.aot.pool_size % micro:
            raise ValueError(
                f"aot.pool_size ({self.aot.pool_size}) must be a multiple of the micro-batch "
                f"({micro} = batch_gpu or batch)"
            )
        return self


class SweepParams(Section):
    """Sampler grid (method-notes b.2, d.1): every point uses the same per-image seeds."""

    steps: list[int] = Field(default_factory=lambda: [14, 15, 18], min_length=1)
    rho: list[float] = Field(default_factory=lambda: [7.0, 72.0, 90.0], min_length=1)
    solver: list[Literal["heun", "euler"]] = Field(default_factory=lambda: ["heun"], min_length=1)
    num_images: int = Field(50_000, ge=2)
    seed_start: int = Field(0, ge=0)
    batch_size: int = Field(250, ge=1)
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)

    @model_validator(mode="after")
    def _valid_grid(self) -> SweepParams:
        if min(self.steps) < 2:
            raise ValueError(f"steps must all be >= 2, got {self.steps}")
        if min(self.rho) <= 0:
            raise ValueError(f"rho must all be > 0, got {self.rho}")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be < sigma_max ({self.sigma_max})")
        return self


class ScoreParams(Section):
    """How samples are scored. ``fid``: clean-fid Inception (needs its weights file). ``fd``:
    Frechet distance in the features of a small classifier the project trains on the dataset,
    reported as ``fd_<dataset>`` (never as FID)."""

    metric: Literal["fid", "fd"] = "fd"
    inception_weights: str | None = Field(
        None, description="local inception-2015-12-05.pt; None = clean-fid's"
    )
    feature_epochs: int = Field(30, ge=1)
    feature_seed: int = Field(0, ge=0)


class Variant(Section):
    """One model of a comparison, trained on the same data, budget and seeds as the others.

    The optional overrides let one profile express arms x training seeds (x conditioning):
    ``seed`` replaces ``train.seed``, ``pool_size`` replaces ``train.aot.pool_size`` (AOT
    variants only), ``cond`` replaces ``network.cond``. ``arm`` names the group the variant
    belongs to in ``aot study-report`` (default: the variant's own name); variants of one arm
    differ only by seed."""

    aot: bool
    arm: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    seed: int | None = Field(None, ge=0)
    pool_size: int | None = Field(None, ge=1)
    cond: bool | None = None

    @model_validator(mode="after")
    def _pool_needs_aot(self) -> Variant:
        if self.pool_size is not None and not self.aot:
            raise ValueError(
                f"pool_size ({self.pool_size}) only applies to AOT variants (aot: true)"
            )
        return self


def apply_variant(
    network: NetworkParams, train: TrainParams, variant: Variant
) -> tuple[NetworkParams, TrainParams]:
    """The ``network`` and ``train`` sections with the variant's overrides, validated again."""
    if variant.cond is not None:
        network = network.model_copy(update={"cond": variant.cond})
    raw = train.model_dump()
    if variant.seed is not None:
        raw["seed"] = variant.seed
    if variant.pool_size is not None:
        raw["aot"]["pool_size"] = variant.pool_size
    return network, TrainParams.model_validate(raw)


class Params(Section):
    data: DataParams = DataParams()
    network: NetworkParams = NetworkParams()
    train: TrainParams = TrainParams()
    variants: dict[str, Variant] = Field(
        default_factory=lambda: {"aot": Variant(aot=True), "edm": Variant(aot=False)}, min_length=1
    )
    sweep: SweepParams = SweepParams()
    score: ScoreParams = ScoreParams()

    @model_validator(mode="after")
    def _variants_fit_training(self) -> Params:
        for name, variant in self.variants.items():
            try:
                apply_variant(self.network, self.train, variant)
            except ValidationError as error:
                problems = "; ".join(
                    str(item.get("ctx", {}).get("error", item["msg"])) for item in error.errors()
                )
                raise ValueError(f"variants.{name}: {problems}") from None
        return self


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "params"
        shown = item["loc"] and item["type"] != "missing" and "input" in item  # not whole sections
        got = f" (got {item['input']!r})" if shown else ""
        lines.append(f"  {where}: {item['msg']}{got}")
    return "\n".join(lines)


def parse_params(raw: dict) -> Params:
    """Validate a params mapping; raises ConfigError listing every problem at once."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as error:
        raise ConfigError(f"invalid parameters:\n{_describe(error)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw)
