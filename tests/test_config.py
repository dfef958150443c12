"""params.yaml schema: every bad value is reported with its key and the allowed values."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from aot_model.networks import EDMPrecond, SongUNet
from aot_model.training import TRAIN_DEFAULTS
from aot_pipeline.config import (
    ConfigError,
    NetworkParams,
    Params,
    TrainParams,
    load_params,
    parse_params,
    train_options,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "path", ["params.yaml", "configs/cifar10-uncond.yaml", "configs/cifar10-cond.yaml"]
)
def test_shipped_parameter_files_are_valid(path):
    params = load_params(ROOT / path)
    assert set(params.variants) == {"aot", "edm"}
    assert params.variants["aot"].aot and not params.variants["edm"].aot


def test_paper_configs_carry_the_authors_settings():
    uncond = load_params(ROOT / "configs/cifar10-uncond.yaml")
    cond = load_params(ROOT / "configs/cifar10-cond.yaml")
    assert (uncond.train.batch, uncond.train.aot.pool_size, uncond.network.arch) == (
        256,
        512,
        "ncsnpp",
    )
    assert (cond.network.cond, cond.train.aot.pool_size) == (True, 2048)
    assert uncond.score.metric == "fid" and uncond.sweep.num_images == 50_000


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # The pairing's choices come from its registries; a new entry must not break these.
        ({"train": {"aot": {"cost": "l1"}}}, "train.aot.cost: Input should be 'euclidean'"),
        ({"train": {"aot": {"solver": "hungarian"}}}, "train.aot.solver: Input should be 'scipy'"),
        ({"network": {"arch": "unet"}}, "network.arch: Input should be 'ddpmpp' or 'ncsnpp'"),
        ({"data": {"dataset": "mnist"}}, "data.dataset: Input should be 'digits' or 'cifar10'"),
        ({"train": {"bach": 64}}, "train.bach: Extra inputs are not permitted"),
        ({"train": {"batch": 0}}, "train.batch: Input should be greater than or equal to 1"),
        (
            {"train": {"batch": 64, "aot": {"pool_size": 100}}},
            "aot.pool_size (100) must be a multiple",
        ),
        (
            {"train": {"batch": 64, "batch_gpu": 24}},
            "batch (64) must be a multiple of batch_gpu (24)",
        ),
        ({"sweep": {"steps": [1, 18]}}, "steps must all be >= 2"),
        ({"sweep": {"sigma_min": 90.0}}, "sigma_min (90.0) must be < sigma_max (80.0)"),
        ({"sweep": {"solver": ["rk4"]}}, "sweep.solver.0: Input should be 'heun' or 'euler'"),
        ({"sweep": {"precision": "fp16"}}, "sweep.precision: Input should be 'fp32' or 'bf16'"),
        ({"score": {"metric": "kid"}}, "score.metric: Input should be 'fid' or 'fd'"),
        # Strict types: YAML strings are not silently coerced.
        (
            {"variants": {"aot": {"aot": "off"}}},
            "variants.aot.aot: Input should be a valid boolean",
        ),
        ({"network": {"cond": "yes"}}, "network.cond: Input should be a valid boolean"),
        ({"train": {"batch": "64"}}, "train.batch: Input should be a valid integer"),
        ({"train": {"lr": "1e-3"}}, "train.lr: Input should be a valid number"),
        # Finite floats.
        (
            {"train": {"duration_kimg": float("inf")}},
            "train.duration_kimg: Input should be a finite",
        ),
        ({"sweep": {"rho": [7.0, float("inf")]}}, "sweep.rho.1: Input should be a finite number"),
        ({"sweep": {"sigma_max": float("nan")}}, "sweep.sigma_max: Input should be a finite"),
        # The guided sweep's rho: optional, but a non-empty list of finite numbers > 0.
        ({"guidance": {"rho": []}}, "guidance.rho: List should have at least 1 item"),
        ({"guidance": {"rho": [7.0, 0.0]}}, "guidance.rho.1: Input should be greater than 0"),
        ({"guidance": {"rho": [float("nan")]}}, "guidance.rho.0: Input should be a finite"),
        ({"guidance": {"rho": 7.0}}, "guidance.rho: Input should be a valid list"),
        # Cross-section checks.
        (
            {"sweep": {"rho": [7.0, 90.0]}, "guidance": {"rho": [7.0, 72.0]}},
            "guidance.rho [72.0] not in sweep.rho [7.0, 90.0]",
        ),
        (
            {"network": {"channel_mult": [1, 2], "attn_resolutions": [7]}},
            "attn_resolutions [7] match no level of the network; with 16x16 data and "
            "channel_mult [1, 2] the levels run at [16, 8]",
        ),
        (
            {"data": {"dataset": "cifar10", "resolution": 16}},
            "resolution apply to digits only; CIFAR-10 is 3x32x32",
        ),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(raw, expected):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert expected in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_params({"network": {"arch": "unet"}, "train": {"lr": -1}})
    assert "network.arch" in str(info.value) and "train.lr" in str(info.value)


def test_defaults_are_the_paper_settings():
    params = Params()
    assert (params.network.model_channels, params.network.channel_mult) == (128, [2, 2, 2])
    assert (params.train.lr, params.train.ema_halflife_kimg, params.train.augment_p) == (
        1e-3,
        500,
        0.12,
    )
    assert params.train.aot.cost == "euclidean" and params.train.aot.scope == "per_rank"


def _defaults(function) -> dict:
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def test_schema_defaults_are_the_librarys():
    """A params file and a library call that leave an option out train the same run: the schema's
    defaults validate into the library's `TrainOptions()`, the network's into SongUNet's own."""
    options = train_options(NetworkParams(), TrainParams(), aot=True)
    assert dataclasses.replace(options, network=TRAIN_DEFAULTS.network) == TRAIN_DEFAULTS
    library = {**_defaults(SongUNet), **_defaults(EDMPrecond), **TRAIN_DEFAULTS.network.kwargs}
    library = {k: list(v) if isinstance(v, tuple) else v for k, v in library.items()}
    schema = options.network.kwargs
    assert {k: library.get(k, "no library default") for k in schema} == schema
    assert options.network.cls is TRAIN_DEFAULTS.network.cls


def test_network_bounds_are_the_networks():
    network = parse_params({"network": {"num_blocks": 0, "dropout": 1.0}}).network
    assert (network.num_blocks, network.dropout) == (0, 1.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("[1, 2]", "must hold a mapping"), ("train: {", "not valid YAML"), ("", "is empty")],
)
def test_unreadable_files(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_params(path)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_whole_numbers_are_valid_floats():
    assert parse_params({"train": {"duration_kimg": 60, "lr": 1}}).train.duration_kimg == 60.0


def test_round_trip_through_yaml(tmp_path):
    params = load_params(ROOT / "params.yaml")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump()))
    assert load_params(path) == params


def test_guided_rho_defaults_to_the_sweep_and_the_demo_guides_at_rho_7():
    assert Params().guidance.rho is None  # guided_sweep then takes sweep.rho
    assert parse_params({"guidance": {"rho": [7, 90]}}).guidance.rho == [7.0, 90.0]
    demo = load_params(ROOT / "params.yaml")
    assert demo.guidance.rho == [7.0] and 7.0 in demo.sweep.rho


def test_checkpoint_variants_are_imported_not_trained():
    with pytest.raises(ConfigError) as error:
        parse_params({"variants": {"edm": {"aot": False, "checkpoint": "e.pkl", "seed": 1}}})
    assert str(error.value) == (
        "invalid parameters:\n  variants.edm: Value error, seed apply to training; a checkpoint "
        "variant is imported, not trained (got {'aot': False, 'checkpoint': 'e.pkl', 'seed': 1})"
    )
    with pytest.raises(ConfigError, match="checkpoint_sha256 needs checkpoint"):
        parse_params({"variants": {"edm": {"aot": False, "checkpoint_sha256": "0" * 64}}})
