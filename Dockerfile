# launcher on a CUDA runtime image: torch, the package and its dependencies, a non-root user, and
# `launcher` as the entrypoint.
#   docker build -t launcher .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/workspace/runs" launcher run --nproc 8 recipes/gpt.yaml
# The base image brings CUDA, cuDNN and torch; choose another tag with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/launcher
COPY pyproject.toml README.md ./
COPY launcher ./launcher
# the image's torch satisfies the requirement; only the rest is installed
RUN pip install --no-cache-dir "/opt/launcher[examples,vision]"

# recipes are copied where the container starts, so `launcher run recipes/...` works as in the repo
COPY recipes /workspace/recipes
RUN useradd --create-home --uid 1000 --shell /bin/bash train \
    && chown -R 1000:1000 /workspace
# numeric, so that the host (and SLURM's pyxis) can resolve it
USER 1000
WORKDIR /workspace
ENTRYPOINT ["launcher"]
CMD ["--help"]
