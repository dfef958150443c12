"""The one schema of ``params.yaml``: every knob of every step, validated before any compute starts.

Each top-level section belongs to one pipeline step (``data`` -> ``aot prepare``, ``train`` ->
``aot train``, ...), so a DVC stage lists exactly the section it reads and ``dvc repro`` reruns
only what changed.
Unknown keys are errors (a typo must not silently fall back to a default), types are strict
(``"off"`` is not a bool, ``"64"`` not an int) and floats must be finite.
The library owns the choice lists and the network and training defaults (`NETWORK_DEFAULTS`,
`TRAIN_DEFAULTS`); the schema takes them from there, so params.yaml and a library call that leave
an option out build the same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aot_model import pairing, sampling, sweep
from aot_model.data import CIFAR10_MD5, CIFAR10_RESOLUTION, CIFAR10_URL
from aot_model.networks import ARCHS, NETWORK_DEFAULTS, EDMPrecond
from aot_model.pairing import Pairing
from aot_model.training import ADAM, PRECISIONS, TRAIN_DEFAULTS, Component, TrainOptions


class ConfigError(ValueError):
    """``params.yaml`` is invalid; the message names every offending key and its allowed values."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


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

    @model_validator(mode="after")
    def _digits_only_knobs(self) -> DataParams:
        given = sorted({"resolution", "channels"} & self.model_fields_set)
        if self.dataset == "cifar10" and given:
            raise ValueError(f"{', '.join(given)} apply to digits only; CIFAR-10 is 3x32x32")
        return self

    @property
    def image_resolution(self) -> int:
        return CIFAR10_RESOLUTION if self.dataset == "cifar10" else self.resolution


class NetworkParams(Section):
    """SongUNet behind EDM preconditioning (method-notes b.4). The bounds are the network's:
    num_blocks 0 and dropout 1 build and train (EDM's train.py takes dropout in [0, 1])."""

    arch: Literal[ARCHS] = NETWORK_DEFAULTS.arch
    cond: bool = TRAIN_DEFAULTS.cond
    model_channels: int = Field(NETWORK_DEFAULTS.model_channels, ge=1)
    channel_mult: list[int] = Field(
        default_factory=lambda: list(NETWORK_DEFAULTS.channel_mult), min_length=1
    )
    num_blocks: int = Field(NETWORK_DEFAULTS.num_blocks, ge=0)
    attn_resolutions: list[int] = Field(
        default_factory=lambda: list(NETWORK_DEFAULTS.attn_resolutions)
    )
    dropout: float = Field(NETWORK_DEFAULTS.dropout, ge=0.0, le=1.0)


class AOTParams(Section):
    """Approximated optimal transport pairing (method-notes a.2); on/off is set per variant."""

    pool_size: int = Field(
        TRAIN_DEFAULTS.pool_size, ge=1, description="images matched at once, per rank"
    )
    cost: Literal[tuple(pairing.COSTS)] = TRAIN_DEFAULTS.pairing.cost
    solver: Literal[tuple(pairing.SOLVERS)] = TRAIN_DEFAULTS.pairing.solver
    scope: Literal[pairing.SCOPES] = TRAIN_DEFAULTS.pairing.scope
    prefetch: bool | None = Field(
        TRAIN_DEFAULTS.prefetch, description="build the next pool in a thread; None: unless global"
    )


class TrainParams(Section):
    """Optimisation (method-notes b.5). Durations and cadences are in thousands of images (kimg)."""

    seed: int = Field(TRAIN_DEFAULTS.seed, ge=0)
    duration_kimg: float = Field(TRAIN_DEFAULTS.duration_kimg, gt=0)
    batch: int = Field(
        TRAIN_DEFAULTS.batch, ge=1, description="images per optimizer step, all ranks"
    )
    batch_gpu: int | None = Field(
        TRAIN_DEFAULTS.batch_gpu, ge=1, description="micro-batch per rank; None = batch / ranks"
    )
    lr: float = Field(ADAM.kwargs["lr"], gt=0)
    lr_rampup_kimg: float = Field(TRAIN_DEFAULTS.lr_rampup_kimg, ge=0)
    ema_halflife_kimg: float = Field(TRAIN_DEFAULTS.ema_halflife_kimg, gt=0)
    ema_rampup_ratio: float | None = Field(TRAIN_DEFAULTS.ema_rampup_ratio, gt=0)
    augment_p: float = Field(TRAIN_DEFAULTS.augment_p, ge=0, le=1)
    tick_kimg: float = Field(TRAIN_DEFAULTS.tick_kimg, gt=0)
    snapshot_ticks: int = Field(TRAIN_DEFAULTS.snapshot_ticks, ge=1)
    keep_snapshots: int = Field(TRAIN_DEFAULTS.keep_snapshots, ge=1)
    precision: Literal[PRECISIONS] = TRAIN_DEFAULTS.precision
    compile: bool = TRAIN_DEFAULTS.compile
    tf32: bool = TRAIN_DEFAULTS.tf32
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
    solver: list[Literal[sampling.SOLVERS]] = Field(default_factory=lambda: ["heun"], min_length=1)
    num_images: int = Field(50_000, ge=2)
    seed_start: int = Field(0, ge=0)
    batch_size: int = Field(250, ge=1)
    sigma_min: float = Field(0.002, gt=0)
    sigma_max: float = Field(80.0, gt=0)
    precision: Literal[sweep.PRECISIONS] = Field(
        "fp32",
        description="the network's evaluations while sampling (sweep, guided sweep, fakes, the "
        "discriminator's selection, `aot fid --run-dir`): fp32 as EDM sampled, or bf16 autocast, "
        "the opt-in fast path (on CUDA also channels-last); its score difference to fp32 is in "
        "docs/benchmarks.md; recorded in every row and score",
    )

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
    fid_mode: Literal["clean", "legacy_tensorflow"] = Field(
        "clean",
        description="fid only: clean-fid's 'clean' resize, or 'legacy_tensorflow' (the Inception "
        "graph's own TF-compatible resize, as EDM's fid.py: the protocol of published CIFAR-10 "
        "FIDs); recorded with every score, never compared across modes",
    )
    reference_file: str | None = Field(
        None,
        description="fid only: reference statistics .npz with mu and sigma (e.g. EDM's "
        "fid-refs/cifar10-32x32.npz), used instead of computing them from the dataset",
    )
    feature_epochs: int = Field(30, ge=1)
    feature_seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fid_only(self) -> ScoreParams:
        chosen = {"fid_mode": self.fid_mode != "clean", "reference_file": self.reference_file}
        given = [name for name, value in chosen.items() if value]
        if self.metric != "fid" and given:
            raise ValueError(f"{', '.join(given)} apply to metric fid only")
        return self


class ExtractorParams(Section):
    """DG's frozen feature extractor (method-notes g.2). ``adm``: ADM's 32x32 classifier from
    ``checkpoint`` (a guided-diffusion state dict, e.g. DG's ``32x32_classifier.pt``; 32x32 RGB data
    only). ``own``: an ADM encoder of the size below, trained here on the dataset as a noise-aware
    classifier (the offline default; defaults = ADM's 32x32 classifier shape)."""

    kind: Literal["own", "adm"] = "own"
    checkpoint: str | None = Field(None, description="adm only: path to the classifier state dict")
    model_channels: int = Field(128, ge=32, multiple_of=32)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    num_blocks: int = Field(4, ge=1)
    attn_resolutions: list[int] = Field(default_factory=lambda: [32, 16, 8])
    num_head_channels: int = Field(64, ge=1)
    epochs: int = Field(10, ge=1, description="own only")
    batch: int = Field(128, ge=1, description="own only")
    lr: float = Field(3e-4, gt=0, description="own only")

    @model_validator(mode="after")
    def _checkpoint_for_adm(self) -> ExtractorParams:
        if self.kind == "adm" and not self.checkpoint:
            raise ValueError("kind 'adm' needs checkpoint: the path of the ADM classifier file")
        return self


class GuidanceParams(Section):
    """Discriminator Guidance on one variant's model (method-notes g). Defaults are DG's CIFAR-10
    settings where known; unconfirmed choices (a.7, g.5) are parameters."""

    variant: str = Field("aot", description="the params `variants` key whose model is guided")
    extractor: ExtractorParams = ExtractorParams()
    head_channels: int = Field(128, ge=32, multiple_of=32, description="DG: 128")
    head_blocks: int = Field(2, ge=1, description="DG: 2")
    num_fakes: int = Field(50_000, ge=2, description="generated training images (DG: 50k)")
    fake_steps: int = Field(18, ge=2, description="sampler of the fakes (DG: 18 steps, rho 7)")
    fake_rho: float = Field(7.0, gt=0)
    fake_seed_start: int = Field(1_000_000, ge=0, description="apart from the sweep's seeds")
    epochs: int = Field(50, ge=1, description="DG code default 50")
    batch: int = Field(128, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-7, ge=0)
    sigma_min: float = Field(1e-3, gt=0, description="log-uniform training noise levels")
    sigma_max: float = Field(152.0, gt=0)
    noise: Literal["independent", "aot"] = Field(
        "independent", description="aot: noise matched to each batch (one reading of AOT + DG)"
    )
    seed: int = Field(0, ge=0)
    weights: list[float] = Field(
        default_factory=lambda: [2.0],
        min_length=1,
        description="sweep axis (DG uncond: 2). Without second_order (DG's released default) "
        "only the Euler step is guided, so Heun's average follows the ODE guided with w/2: "
        "compare with DG's papers accordingly (method-notes g.4)",
    )
    rho: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, min_length=1, description="rho of the guided sweep; None = sweep.rho (DG: 7)"
    )
    second_order: bool = Field(
        False,
        description="also guide the Heun corrector. false (DG's default) guides the Euler step "
        "only: Heun's average converges to the probability-flow ODE with weight w/2, so a "
        "perfect discriminator at w = 1 does not reach the data distribution; true reaches it "
        "with weight w",
    )
    sigma_threshold: float = Field(0.0447, ge=0, description="guide at sigma >= (DG: tau 0.01)")
    select_images: int = Field(500, ge=2, description="guided samples scored per epoch")
    select_steps: int = Field(18, ge=2)
    select_rho: float = Field(7.0, gt=0)
    select_seed_start: int = Field(2_000_000, ge=0, description="apart from the sweep's seeds")

    @model_validator(mode="after")
    def _valid(self) -> GuidanceParams:
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be < sigma_max ({self.sigma_max})")
        if not all(w > 0 for w in self.weights):  # finite: allow_inf_nan
            raise ValueError(f"weights must be finite numbers > 0, got {self.weights}")
        return self


class Variant(Section):
    """One model of a comparison, trained on the same data, budget and seeds as the others.

    The optional overrides let one profile express arms x training seeds (x conditioning):
    ``seed`` replaces ``train.seed``, ``pool_size`` replaces ``train.aot.pool_size`` (AOT
    variants only), ``cond`` replaces ``network.cond``. ``arm`` names the group the variant
    belongs to in ``aot study-report`` (default: the variant's own name); variants of one arm
    differ only by seed. ``duration_kimg`` replaces ``train.duration_kimg``, so the unconditional
    and the conditional comparison can each train until its baseline stops improving;
    ``aot study-report`` refuses compared variants with different budgets. ``checkpoint`` makes
    the variant evaluate-only: its train stage imports that EDM-format pickle
    (``steps.import_checkpoint``) and everything after it runs unchanged."""

    aot: bool
    arm: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    checkpoint: str | None = Field(
        None,
        description="evaluate a released EDM-format network pickle instead of training: a local "
        "path, s3://bucket/key or https:// URL, downloaded once and imported without running "
        "its code (`aot import-edm`); aot then records how that model was trained",
    )
    checkpoint_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="expected SHA-256 of the checkpoint file"
    )
    seed: int | None = Field(None, ge=0)
    pool_size: int | None = Field(None, ge=1)
    cond: bool | None = None
    duration_kimg: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _overrides_apply(self) -> Variant:
        if self.checkpoint_sha256 is not None and self.checkpoint is None:
            raise ValueError("checkpoint_sha256 needs checkpoint")
        training = [k for k in ("cond", "duration_kimg", "pool_size", "seed")
                    if getattr(self, k) is not None]  # fmt: skip
        if self.checkpoint is not None and training:
            raise ValueError(
                f"{', '.join(training)} apply to training; a checkpoint variant is imported, "
                "not trained"
            )
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
    if variant.duration_kimg is not None:
        raw["duration_kimg"] = variant.duration_kimg
    return network, TrainParams.model_validate(raw)


def train_options(network: NetworkParams, train: TrainParams, aot: bool) -> TrainOptions:
    """What a variant's ``network`` and ``train`` sections (`apply_variant`) validate into: the
    library's options, with EDMPrecond, EDMLoss and Adam; ``aot`` False pairs as EDM does."""
    a = train.aot
    return TrainOptions(
        network=Component(EDMPrecond, network.model_dump(exclude={"cond"})),
        optimizer=Component(ADAM.cls, ADAM.kwargs | {"lr": train.lr}),
        pairing=Pairing(a.cost, a.solver, a.scope) if aot else None,
        cond=network.cond,
        pool_size=a.pool_size,
        prefetch=a.prefetch,
        **train.model_dump(exclude={"aot", "lr"}),
    )


class TrackingParams(Section):
    """What MLflow and S3 receive besides metrics (aot_pipeline/tracking.py). Read by every step;
    no DVC stage depends on it, since it changes no output."""

    log_snapshots: bool = Field(False, description="also log the kept intermediate checkpoints")
    register_models: bool = Field(True, description="register each model as aot-<data>-<variant>")
    checkpoint_url: str | None = Field(
        None, description="s3://bucket/prefix: copy every checkpoint there (verified, retried)"
    )

    @model_validator(mode="after")
    def _s3_url(self) -> TrackingParams:
        if self.checkpoint_url is not None and not self.checkpoint_url.startswith("s3://"):
            raise ValueError(f"checkpoint_url must start with s3://, got {self.checkpoint_url!r}")
        return self


class Params(Section):
    data: DataParams = DataParams()
    network: NetworkParams = NetworkParams()
    train: TrainParams = TrainParams()
    variants: dict[str, Variant] = Field(
        default_factory=lambda: {"aot": Variant(aot=True), "edm": Variant(aot=False)}, min_length=1
    )
    sweep: SweepParams = SweepParams()
    score: ScoreParams = ScoreParams()
    tracking: TrackingParams = TrackingParams()
    guidance: GuidanceParams = GuidanceParams()

    @model_validator(mode="after")
    def _attention_at_a_level(self) -> Params:
        """SongUNet attends at the resolutions its levels run at: R, R/2, ... (one per mult)."""
        resolution = self.data.image_resolution
        levels = [resolution >> i for i in range(len(self.network.channel_mult))]
        unused = [r for r in self.network.attn_resolutions if r not in levels]
        if unused:
            raise ValueError(
                f"network.attn_resolutions {unused} match no level of the network; with "
                f"{resolution}x{resolution} data and channel_mult {self.network.channel_mult} "
                f"the levels run at {levels}"
            )
        return self

    @property
    def guided(self) -> bool:
        """The guided arm runs only where the params file has a ``guidance`` section (profiles such
        as the seeded study leave it out and name their variants freely)."""
        return "guidance" in self.model_fields_set

    @model_validator(mode="after")
    def _guided_variant_and_rho(self) -> Params:
        """The guided model is a variant; guided points are compared with the unguided sweep at
        the same (steps, rho)."""
        if self.guided and self.guidance.variant not in self.variants:
            raise ValueError(
                f"guidance.variant must be one of {sorted(self.variants)}, "
                f"got {self.guidance.variant!r}"
            )
        extra = sorted(set(self.guidance.rho or ()) - set(self.sweep.rho))
        if extra:
            raise ValueError(
                f"guidance.rho {extra} not in sweep.rho {self.sweep.rho}: each guided point is "
                "compared with the unguided model at the same steps and rho"
            )
        return self

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


def parse_params(raw: dict) -> Params:
    """Validate a params mapping; raises ConfigError listing every problem at once."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as error:
        lines = ["invalid parameters:"]
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "params"
            # The offending value, not whole sections.
            shown = item["loc"] and item["type"] != "missing" and "input" in item
            got = f" (got {item['input']!r})" if shown else ""
            lines.append(f"  {where}: {item['msg']}{got}")
        raise ConfigError("\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if raw is None:
        raise ConfigError(
            f"{path} is empty; write the sections to set (see the shipped params.yaml), since "
            "an empty file would silently mean the paper's full-size CIFAR-10 run"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw)
