"""Trained models in the MLflow model registry: an MLflow pyfunc sampler around the final
checkpoint, registered as ``aot-<dataset>-<variant>``, tagged with its score, with the
``champion`` alias on the best-scoring version.

``mlflow.pyfunc.load_model("models:/aot-digits-aot/1").predict(pd.DataFrame({"seed": [0, 1]}),
params={"num_steps": 18, "rho": 7.0, "solver": "heun"})`` returns uint8 images ``[N, C, H, W]``;
image k depends on seed k alone (EDM's per-image seeds). An optional ``class_label`` column picks
the class of a conditional model (otherwise drawn from the seed, as ``aot sweep`` does).
Loading needs only this package installed. The sampler runs on the GPU when there is a usable one
(``--device auto``'s rule), where the seeds' latents come from CUDA generators, as in EDM's
``generate.py``, and so differ from the CPU's.
"""

from __future__ import annotations

import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

CHAMPION = "champion"
SAMPLER_PARAMS = {
    "num_steps": 18,
    "rho": 7.0,
    "solver": "heun",
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "batch_size": 256,
}


class Sampler(mlflow.pyfunc.PythonModel):
    """EDM's deterministic sampler (method-notes b.2) on the EMA weights of one checkpoint."""

    def load_context(self, context) -> None:
        from aot_model import devices
        from aot_model.checkpoints import build_network_from_checkpoint

        self.device, _ = devices.resolve("auto", "the sampler's device")
        checkpoint = context.artifacts["checkpoint"]
        self.net = build_network_from_checkpoint(checkpoint, ema=True, device=self.device)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        from aot_model.sweep import SweepPoint, generate_images

        settings = {**SAMPLER_PARAMS, **(params or {})}
        net, labels = self.net, model_input.get("class_label")
        batches = generate_images(
            net,
            SweepPoint(int(settings["num_steps"]), float(settings["rho"]), str(settings["solver"])),
            [int(s) for s in model_input["seed"]],
            img_shape=(net.img_channels, net.img_resolution, net.img_resolution),
            label_dim=net.label_dim,
            batch_size=int(settings["batch_size"]),
            sigma_min=float(settings["sigma_min"]),
            sigma_max=float(settings["sigma_max"]),
            device=self.device,
            labels=None if labels is None else [int(c) for c in labels],
        )
        return np.concatenate([batch.images for batch in batches])


def log_sampler(step_run, checkpoint: str | Path, image_shape: tuple[int, int, int]) -> None:
    """Save the pyfunc sampler with ``checkpoint`` inside and log it as the run's ``model``
    artifact. Its signature: seed (required) and class_label (optional) columns, the sampler
    settings as params."""
    inputs = Schema([ColSpec("long", "seed"), ColSpec("long", "class_label", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape))])
    kinds = {int: "long", float: "double", str: "string"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in SAMPLER_PARAMS.items()])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # An input example would make MLflow load and run the sampler at save time.
        warnings.filterwarnings("ignore", "An input example was not provided", UserWarning)
        folder = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            folder,
            python_model=str(Path(__file__).with_name("sampler_model.py")),
            artifacts={"checkpoint": str(checkpoint)},
            pip_requirements=[f"aot-diffusion=={metadata.version('aot-diffusion')}"],
            signature=ModelSignature(inputs=inputs, outputs=outputs, params=params),
        )
        step_run.log_artifact(folder, "model")


def register(client, run_id: str, name: str, tags: dict[str, str]):
    """Register the ``model`` artifact of ``run_id`` as a new version of ``name``."""
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    return client.create_model_version(name, source, run_id=run_id, tags=tags)


def annotate(client, name: str, checkpoint_sha256: str, score: dict[str, str]) -> None:
    """Tag the version built from ``checkpoint_sha256`` with ``score`` (metric, best score and
    its NFE) and move ``champion`` to the version with the lowest best score of that metric."""
    versions = client.search_model_versions(f"name = '{name}'")
    for version in versions:
        if version.tags.get("checkpoint_sha256") == checkpoint_sha256:
            for key, value in score.items():
                client.set_model_version_tag(name, version.version, key, value)
            version.tags.update(score)
    scored = [
        v for v in versions if v.tags.get("metric") == score["metric"] and "best_score" in v.tags
    ]
    if scored:
        best = min(scored, key=lambda v: (float(v.tags["best_score"]), -int(v.version)))
        client.set_registered_model_alias(name, CHAMPION, best.version)
