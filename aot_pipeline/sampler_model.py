"""Entry point MLflow runs to load a registered sampler (models from code: no pickled object)."""

from mlflow.models import set_model

from aot_pipeline.registry import Sampler

set_model(Sampler())
