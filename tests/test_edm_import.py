"""`aot import-edm`: EDM-format network pickles read as data (aot_model/edm_pickle.py), the run
folder it writes sampled by the project's commands, and every refusal's one line."""

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from builders import TINY_PARAMS, run_options
from edm_fixtures import (
    AUGMENT_SRC,
    LOSS_SRC,
    NETWORKS_SRC,
    Global,
    Reduce,
    Writer,
    tiny_network,
    write_snapshot,
)
from typer.testing import CliRunner

from aot_model import edm_pickle
from aot_model.checkpoints import build_network_from_checkpoint, find_checkpoints, load_checkpoint
from aot_model.training import training_loop
from aot_pipeline.cli import app

CASES = [("ddpmpp", 0), ("ddpmpp", 4), ("ncsnpp", 0), ("ncsnpp", 4)]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "channels": 3}}))
    return path


def outputs(net, label_dim: int) -> torch.Tensor:
    """D(x; sigma) at three noise levels with class and augmentation labels (so every tensor,
    map_augment's included, reaches the output)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=g) * 2
    augment = torch.randn(3, 9, generator=g)
    labels = torch.eye(label_dim)[[0, 1, 3]] if label_dim else None
    with torch.no_grad():
        return net(x, torch.tensor([0.01, 0.7, 40.0]), labels, augment)


# ------------------------------------------------------------------------------------------------
# The imported network


@pytest.mark.parametrize(("arch", "label_dim"), CASES)
def test_imported_network_equals_the_network_its_tensors_came_from(tmp_path, arch, label_dim):
    net, config = tiny_network(arch, label_dim)
    src = write_snapshot(tmp_path / "network-snapshot.pkl", net, config)
    result = edm_pickle.import_edm(src, tmp_path / "run")
    (checkpoint,) = find_checkpoints(tmp_path / "run")
    imported = build_network_from_checkpoint(checkpoint)
    assert torch.equal(outputs(imported, label_dim), outputs(net, label_dim))
    assert result["architecture"] == {"ddpmpp": "DDPM++", "ncsnpp": "NCSN++"}[arch]
    if arch == "ncsnpp":  # the file's draw, not this project's FOURIER_SEED draw
        assert torch.equal(imported.model.map_noise.freqs, net.model.map_noise.freqs)


def test_unrecorded_arguments_take_edms_defaults(tmp_path):
    """train.py never records channel_mult_emb or dropout; a file that does not record
    channel_mult either means EDM's [1, 2, 2, 2] (this project's SongUNet default is [2, 2, 2])."""
    net, config = tiny_network("ddpmpp", channel_mult=[1, 2, 2, 2])
    record = {k: config[k] for k in ("embedding_type", "model_channels", "num_blocks",
                                     "attn_resolutions", "augment_dim") if k in config}  # fmt: skip
    src = write_snapshot(tmp_path / "s.pkl", net, config, record={**record, "augment_dim": 9})
    kwargs = edm_pickle.import_edm(src, tmp_path / "run")["network_kwargs"]
    assert (kwargs["channel_mult"], kwargs["dropout"], kwargs["channel_mult_emb"]) == (
        [1, 2, 2, 2], 0.1, 4)  # fmt: skip
    assert kwargs["resample_filter"] == [1, 1] and kwargs["label_dropout"] == 0
    imported = build_network_from_checkpoint(find_checkpoints(tmp_path / "run")[0])
    assert torch.equal(outputs(imported, 0), outputs(net, 0))


def test_numpy_1_scalar_name_reads_too(tmp_path):
    net, config = tiny_network("ddpmpp")
    writer = Writer(numpy_module="numpy.core.multiarray")
    src = write_snapshot(tmp_path / "s.pkl", net, config, writer=writer)
    assert b"numpy.core.multiarray" in src.read_bytes()
    snapshot = edm_pickle.load_snapshot(src)
    assert torch.equal(snapshot.state_dict["model.enc_in.weight"], net.model.enc_in.weight)


def test_import_record_and_checkpoint(tmp_path):
    net, config = tiny_network("ncsnpp", 4)
    src = write_snapshot(tmp_path / "network-snapshot-200000.pkl", net, config)
    edm_pickle.import_edm(src, tmp_path / "run", name="edm-aot")
    info = json.loads((tmp_path / "run" / "import.json").read_text())
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert (info["name"], info["source"], info["source_sha256"]) == ("edm-aot", str(src), digest)
    assert info["architecture"] == "NCSN++"
    sources = {s["sha256"]: (s["classes"], s["known"]) for s in info["embedded_sources"]}
    sha = {text: hashlib.sha256(text.encode()).hexdigest() for text in (NETWORKS_SRC, LOSS_SRC,
                                                                        AUGMENT_SRC)}  # fmt: skip
    assert sources == {
        sha[NETWORKS_SRC]: (["Conv2d", "EDMPrecond", "FourierEmbedding", "GroupNorm", "Linear",
                             "SongUNet", "UNetBlock"], False),
        sha[LOSS_SRC]: (["EDMLoss"], False),
        sha[AUGMENT_SRC]: (["AugmentPipe"], False),
    }  # fmt: skip
    assert len(info["warnings"]) == 3
    assert info["recorded_kwargs"]["SongUNet"] == {
        "img_resolution": 8, "in_channels": 3, "out_channels": 3, "label_dim": 4,
        "embedding_type": "fourier", "encoder_type": "residual", "decoder_type": "standard",
        "channel_mult_noise": 2, "resample_filter": [1, 3, 3, 1], "model_channels": 8,
        "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "augment_dim": 9,
    }  # fmt: skip
    assert info["recorded_kwargs"]["EDMPrecond"]["model_type"] == "SongUNet"
    assert info["precond_attributes"]["sigma_max"] == "inf"
    assert info["other_entries"]["loss_fn"] == {
        "class": "EDMLoss", "P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}  # fmt: skip
    assert info["other_entries"]["dataset_kwargs"]["path"] == "datasets/cifar10-32x32.zip"
    state = load_checkpoint(tmp_path / "run" / "training-state-000000000.pt")
    assert state["imported"] == {"source": str(src), "source_sha256": digest,
                                 "tool": "aot import-edm"}  # fmt: skip
    assert info["checkpoint_sha256"] == hashlib.sha256(
        (tmp_path / "run" / "training-state-000000000.pt").read_bytes()).hexdigest()  # fmt: skip


def test_training_refuses_to_resume_an_imported_run(tmp_path, toy):
    net, config = tiny_network("ddpmpp")
    src = write_snapshot(tmp_path / "s.pkl", net, config)
    edm_pickle.import_edm(src, tmp_path / "run")
    checkpoint = tmp_path / "run" / "training-state-000000000.pt"
    with pytest.raises(ValueError) as error:
        options = run_options(duration_kimg=0.016)
        training_loop(tmp_path / "run", toy, options, resume="auto", progress=False)
    assert str(error.value) == (
        f"cannot resume from {checkpoint}: it was imported from {src} (network weights only, no "
        "optimizer, data or RNG state); train in another run_dir"
    )


# ------------------------------------------------------------------------------------------------
# Never running the file's code


def test_embedded_source_is_never_run(tmp_path, params):
    """A snapshot whose embedded networks.py writes a file when executed: importing it, sampling
    fakes from it and loading it in the registry's sampler leave no such file."""
    marker = tmp_path / "ran"
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    exec(compile(payload, "payload", "exec"), {})  # the premise: running the source writes it
    assert marker.exists()
    marker.unlink()
    net, config = tiny_network("ncsnpp", 4)
    src = write_snapshot(tmp_path / "s.pkl", net, config, writer=Writer(networks_src=payload))
    run = tmp_path / "run"
    result = invoke("import-edm", src, "--out", run, "--params", params)
    assert result.exit_code == 0, result.output
    assert "warning: embedded source" in result.output
    fakes = tmp_path / "fakes.npz"
    result = invoke("fakes", "--run-dir", run, "--out", fakes, "--params", params)
    assert result.exit_code == 0, result.output
    from aot_pipeline.registry import Sampler

    sampler = Sampler()
    sampler.load_context(SimpleNamespace(artifacts={"checkpoint": str(find_checkpoints(run)[0])}))
    import pandas as pd

    images = sampler.predict(None, pd.DataFrame({"seed": [1_000_000, 1_000_001]}),
                             {"num_steps": 2, "rho": 7.0})  # fmt: skip
    with np.load(fakes) as f:  # the registry's sampler and `aot fakes` agree image for image
        np.testing.assert_array_equal(images, f["images"][:2])
        assert f["images"].shape == (64, 3, 8, 8)
    assert not marker.exists()


def test_imported_run_is_swept_and_scored(tmp_path, params):
    """`aot sweep --run-dir` and `aot fid --run-dir` take the imported folder unchanged."""
    net, config = tiny_network("ddpmpp")
    src = write_snapshot(tmp_path / "s.pkl", net, config)
    run, data, ref = tmp_path / "run", tmp_path / "data.npz", tmp_path / "ref"
    for args in (
        ("import-edm", src, "--out", run),
        ("prepare", "--out", data),
        ("reference", "--data", data, "--out", ref),
        ("sweep", "--variant", "aot", "--run-dir", run, "--out", tmp_path / "sweep",
         "--reference", ref),
        ("fid", "--run-dir", run, "--steps", 2, "--blocks", 1, "--reference", ref),
    ):  # fmt: skip
        result = invoke(*args, "--params", params)
        assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "sweep" / "aot_sweep.json").read_text())
    assert [(r["num_steps"], r["nfe"]) for r in rows] == [(2, 3), (4, 7)]


# ------------------------------------------------------------------------------------------------
# Refusals: one line naming the file and the reason, exit 2, nothing written


def _truncated(tmp_path):
    net, config = tiny_network("ddpmpp")
    src = write_snapshot(tmp_path / "s.pkl", net, config)
    src.write_bytes(src.read_bytes()[:100_000])
    return src


def _empty(tmp_path):
    src = tmp_path / "e.pkl"
    src.write_bytes(b"")
    return src


def _zip(tmp_path):
    src = tmp_path / "training-state-000100.pt"
    torch.save({"net": {}}, src)
    return src


def _snapshot(**kwargs):
    def make(tmp_path):
        net, config = tiny_network("ddpmpp")
        record = kwargs.pop("record_update", None)
        if record is not None:
            base = {k: config[k] for k in ("embedding_type", "encoder_type", "decoder_type",
                                           "channel_mult_noise", "resample_filter",
                                           "model_channels", "channel_mult", "num_blocks",
                                           "attn_resolutions")}  # fmt: skip
            kwargs["record"] = {**base, "augment_dim": 9, **record}
        return write_snapshot(tmp_path / "s.pkl", net, config, **kwargs)

    return make


class Eps5Writer(Writer):
    """GroupNorms with EDM's GroupNorm default eps 1e-5 instead of SongUNet's 1e-6."""

    def norm(self, norm):
        module = super().norm(norm)
        module.args[0]["state"]["eps"] = 1e-5
        return module


EXEC = Reduce(Global("builtins", "exec"), ("open('x', 'w')",))
ORDERED_DICT = Global("collections", "OrderedDict")
REFUSALS = {
    "missing": (lambda tmp_path: tmp_path / "none.pkl", "{src}: not found"),
    "empty": (_empty, "{src}: the file is empty"),
    "truncated": (_truncated, "{src}: truncated or not a pickle (UnpicklingError: pickle "
                  "exhausted before end of frame)"),
    "zip": (_zip, "{src}: a zip archive (a torch.save file such as EDM's training-state-*.pt), "
            "not an EDM network snapshot pickle (network-snapshot-*.pkl)"),
    "global": (_snapshot(entries={"loss_fn": EXEC}), "{src}: refused: the pickle names the "
               "global builtins.exec, which an EDM network snapshot does not need; nothing in it "
               "was run"),
    "build": (_snapshot(entries={"loss_fn": Reduce(ORDERED_DICT, (), state={"x": 1})}),
              "{src}: refused: the pickle sets the state of a OrderedDict, which an EDM network "
              "snapshot never does; nothing in it was run"),
    "no-ema": (_snapshot(entries={"ema": None}), "{src}: no 'ema' entry (keys: ['augment_pipe', "
               "'dataset_kwargs', 'loss_fn'])"),
    "precond": (_snapshot(precond="VPPrecond"), "{src}: the preconditioner is VPPrecond, not "
                "EDMPrecond (EDM's VP, VE and iDDPM baselines are not supported)"),
    "backbone": (_snapshot(backbone="DhariwalUNet"), "{src}: the backbone is DhariwalUNet, not "
                 "SongUNet (EDM's ADM/DhariwalUNet ImageNet model is not supported)"),
    "missing-tensor": (_snapshot(record_update={"num_blocks": 2}), "{src}: tensor "
                       "model.enc.8x8_block1.norm0.weight is missing"),
    "shape": (_snapshot(record_update={"model_channels": 16}), "{src}: tensor "
              "model.map_augment.weight has shape [8, 9], the recorded configuration needs "
              "[16, 9]"),
    "filter": (_snapshot(record_update={"resample_filter": [1, 3, 3, 1]}), "{src}: fixed filter "
               "model.enc.4x4_down.conv0.resample_filter is not the [1, 3, 3, 1] filter the "
               "configuration records"),
    "skip-encoder": (_snapshot(record_update={"encoder_type": "skip"}), "{src}: unsupported "
                     "network configuration (encoder_type must be one of ('standard', "
                     "'residual'), got 'skip')"),
    "fixed-attribute": (_snapshot(writer=Eps5Writer()), "{src}: model.enc.8x8_block0.norm0.eps "
                        "is 1e-05, where this project's SongUNet has 1e-06"),
    "extra-tensor": (_snapshot(record_update={"attn_resolutions": []}), "{src}: tensor "
                     "model.dec.4x4_block1.norm2.bias is not part of the recorded configuration "
                     "(and 11 more)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_and_write_nothing(tmp_path, params, case):
    make, message = REFUSALS[case]
    src = make(tmp_path)
    out = tmp_path / "run"
    result = invoke("import-edm", src, "--out", out, "--params", params)
    assert result.exit_code == 2
    assert result.output == f"error: {message.format(src=src)}\n"
    assert not out.exists() and not (tmp_path / "x").exists()


def test_an_out_folder_holding_a_run_is_refused(tmp_path, params):
    net, config = tiny_network("ddpmpp")
    src = write_snapshot(tmp_path / "s.pkl", net, config)
    out = tmp_path / "run"
    assert invoke("import-edm", src, "--out", out, "--params", params).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = invoke("import-edm", src, "--out", out, "--params", params)
    assert (result.exit_code, result.output) == (
        2, f"error: {out}: already holds a run; import into an empty folder\n")  # fmt: skip
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------------------------
# The evaluate-only profiles (steps.import_checkpoint's S3 download: test_steps.py; its tracked
# run: test_tracked.py; the variant's schema: test_config.py)


PROFILES = {  # profile -> (label_dim, the paper's (steps, rho) points: EDM's and EDM-AOT's)
    "cifar10-uncond-pretrained": (0, {(18, 7.0), (14, 90.0)}),
    "cifar10-cond-pretrained": (10, {(18, 7.0), (15, 72.0)}),
}


def _stand_in_profile(profile: str, folder) -> dict:
    """The evaluate-only profile with fixture snapshots standing in for the released files and
    tiny data and sample counts."""
    from pathlib import Path

    label_dim, points = PROFILES[profile]
    raw = yaml.safe_load((Path(__file__).parents[1] / "configs" / f"{profile}.yaml").read_text())
    grid = {(s, r) for s in raw["sweep"]["steps"] for r in raw["sweep"]["rho"]}
    assert points <= grid and set(raw["variants"]) == {"edm", "edm-aot"}
    assert (raw["score"]["fid_mode"], Path(raw["score"]["reference_file"]).name) == (
        "legacy_tensorflow", "cifar10-32x32.npz")  # fmt: skip
    for name, arch in (("edm", "ddpmpp"), ("edm-aot", "ncsnpp")):
        net, config = tiny_network(arch, label_dim)
        src = write_snapshot(folder / f"{name}.pkl", net, config)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        raw["variants"][name].update(checkpoint=str(src), checkpoint_sha256=digest)
    raw["data"] = {"dataset": "digits", "resolution": 8, "channels": 3}
    raw["network"] = {"attn_resolutions": []}  # validated against the data, unused by imports
    raw["score"] = {"metric": "fd", "feature_epochs": 1}
    raw["sweep"].update(num_images=8, batch_size=8)
    return raw


@pytest.mark.parametrize("profile", list(PROFILES))
def test_pretrained_profile_runs_end_to_end_on_stand_ins(tmp_path, profile):
    """The evaluate-only profile through the pipeline's declaration (`aot demo`): each variant's
    train stage imports its checkpoint, then sweep and report run unchanged."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_stand_in_profile(profile, tmp_path)))
    result = invoke("demo", "--params", params, "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "| solver | steps | rho | NFE | fd_digits edm | fd_digits edm-aot |" in text
    assert text.count("| heun |") == 4  # every (steps, rho) of the grid
    record = json.loads((tmp_path / "out" / "runs" / "edm-aot" / "import.json").read_text())
    assert record["architecture"] == "NCSN++"

    # A second run leaves the imports as they are (the stage is not a fresh training run).
    again = invoke("demo", "--params", params, "--out", tmp_path / "out", "--device", "cpu")
    assert again.exit_code == 0 and "left as is" in again.output, again.output


@pytest.mark.integration
def test_pretrained_profile_through_dvc_repro_matches_the_demo(tmp_path):
    from conftest import BIN, dvc_env, run_ok

    profile = "cifar10-uncond-pretrained"
    project = tmp_path / "project"
    project.mkdir()
    env = dvc_env(tracking="off")
    run_ok(["git", "init", "-q"], project, env)
    run_ok([BIN / "dvc", "init", "-q"], project, env)
    (project / "params.yaml").write_text(yaml.safe_dump(_stand_in_profile(profile, tmp_path)))
    run_ok([BIN / "aot", "pipeline", "dvc-yaml"], project, env)
    run_ok([BIN / "dvc", "repro"], project, env)
    run_ok([BIN / "aot", "demo", "--out", "demo", "--device", "cpu"], project, env)
    dvc_report = (project / "report" / "report.md").read_bytes()
    assert dvc_report == (project / "demo" / "report" / "report.md").read_bytes()


def test_cli_imports_a_variants_checkpoint_and_refuses_mixed_sources(tmp_path):
    net, config = tiny_network("ddpmpp")
    src = write_snapshot(tmp_path / "s.pkl", net, config)
    params = tmp_path / "params.yaml"
    raw = {**TINY_PARAMS, "variants": {"edm": {"aot": False, "checkpoint": str(src)}}}
    params.write_text(yaml.safe_dump({**raw, "guidance": {**raw["guidance"], "variant": "edm"}}))
    out = tmp_path / "run"
    for args, line in (
        ((src, "--variant", "edm"), "give either SRC or --variant, not both or neither"),
        (("--variant", "edm", "--name", "x"), "--name and --sha256 apply to SRC; --variant names "
         "the model and its variants.<name>.checkpoint_sha256 the digest"),
        (("--variant", "aot"), "--variant must be one of ['edm'], got 'aot'"),
    ):  # fmt: skip
        result = invoke("import-edm", *args, "--out", out, "--params", params)
        assert (result.exit_code, result.output) == (2, f"error: {line}\n")
    result = invoke("import-edm", "--variant", "edm", "--out", out, "--params", params)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "import.json").read_text())["name"] == "edm"


def test_a_checkpoint_variant_is_not_trained(tmp_path):
    from aot_pipeline import steps
    from aot_pipeline.config import parse_params

    p = parse_params({"variants": {"edm": {"aot": False, "checkpoint": "e.pkl"}}})
    with pytest.raises(ValueError) as error:
        steps.train(p.network, p.train, p.variants["edm"], tmp_path / "d.npz", tmp_path / "run")
    assert str(error.value) == (
        "the variant names checkpoint e.pkl: it is imported (`aot import-edm --variant NAME`, "
        "steps.import_checkpoint), not trained"
    )
    assert not (tmp_path / "run").exists()
