# aot-diffusion image: the worker and flow-run job image of the Docker and Kubernetes work pools
# (deploy/*.prefect.yaml), and a plain runtime for `aot ...` / `dvc repro`.
# GPU: PyPI's torch 2.14.1 wheel bundles its CUDA runtime (nvidia-* wheels), so this one image runs
# on CPU or, given GPUs (`docker run --gpus all`, or a Kubernetes nvidia.com/gpu request), on
# NVIDIA GPUs; the host needs only the driver. Multi-GPU training: `torchrun --nproc-per-node N`
# inside the job (the flow's `nproc` parameter does this).
# Build and push: see README ("Scaling out").
FROM python:3.11.7-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# `train.compile: true`: Triton builds its kernel launcher with a C compiler at first use (the
# slim image has none); the official python image already ships Python.h. Versions unpinned
# (DL3008): Debian's point releases replace them in the mirror, and the tag fixes bookworm.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first (the largest layer, ~5 GB), then the project's exact pins: code edits reinstall neither.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY aot_model aot_model
COPY aot_pipeline aot_pipeline
# DL3013 sees `.` as unpinned: it is this package, whose dependencies pyproject.toml pins exactly.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[fast,mlops]'
COPY . .

RUN useradd --create-home --uid 1000 aot && chown -R aot /app
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 1000
# No ENTRYPOINT: Prefect's Docker and Kubernetes workers set the container command themselves
# (`prefect flow-run execute`), and `docker run IMAGE aot train ...` works as written.
CMD ["aot", "--help"]
