# aot-diffusion runtime image. PyPI's torch 2.14.1 wheel bundles its CUDA runtime, so the same image
# runs on CPU or, with `docker run --gpus all`, on NVIDIA GPUs (multi-GPU: `torchrun ... -m aot_pipeline.cli`).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DVC_NO_ANALYTICS=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

RUN apt-get update \
    && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first, so code edits do not reinstall torch.
COPY pyproject.toml README.md ./
COPY aot_model aot_model
COPY aot_pipeline aot_pipeline
RUN pip install --upgrade pip && pip install '.[fast,mlops]'
COPY . .

RUN useradd --create-home aot && chown -R aot /app
USER aot
ENTRYPOINT ["aot"]
CMD ["--help"]
