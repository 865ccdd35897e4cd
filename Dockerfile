# kimi-grpc server image: NGC PyTorch (CUDA toolkit + a CUDA build of torch) with the kimi_grpc._C
# extension compiled for Hopper (sm_90a: H100/H200 only). No weights inside: they come from a
# volume (k8s/: a PVC filled by the download Job), the server runs with HF_HUB_OFFLINE=1.
#
#   docker build -t registry.example.com/kimi-grpc:0.1.0 .
#   docker run --gpus all --shm-size 32g -p 50051:50051 -v /data/Kimi-K2.6:/models/Kimi-K2.6:ro \
#     registry.example.com/kimi-grpc:0.1.0 --model /models/Kimi-K2.6 --device cuda \
#     --host 0.0.0.0 --tensor-parallel-size 8
#
# The base is pinned (never `latest`); bump it deliberately, both stages together. The extension
# is built against the torch that ships in the base image (--no-build-isolation), and that torch
# is kept: pip is constrained to its exact version, so no dependency can swap it for a PyPI one.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3

# ---- build: compile the wheel (extension included) -------------------------------------------
FROM ${BASE_IMAGE} AS build
ENV TORCH_CUDA_ARCH_LIST=9.0a \
    KIMI_GRPC_BUILD_CUDA=1 \
    MAX_JOBS=8 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
    && python -m pip install -c /tmp/torch-constraint.txt "setuptools>=77" wheel "pybind11>=2.12" ninja
COPY pyproject.toml setup.py README.md ./
COPY csrc ./csrc
COPY kimi_grpc ./kimi_grpc
RUN python -m pip wheel --no-build-isolation --no-deps -w /wheels . \
    && python -c "import sys, zipfile, glob; \
names = zipfile.ZipFile(glob.glob('/wheels/kimi_grpc-*.whl')[0]).namelist(); \
sys.exit(0 if any(n.startswith('kimi_grpc/_C') for n in names) else 'no kimi_grpc._C in the wheel')"

# ---- runtime -----------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="kimi-grpc" \
      org.opencontainers.image.description="gRPC inference server for Kimi K2.6 (8x H200, TP8)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    HOME=/home/kimi \
    KIMI_GRPC_CACHE_DIR=/tmp/kimi-grpc
COPY --from=build /wheels /wheels
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
    && python -m pip install -c /tmp/torch-constraint.txt /wheels/kimi_grpc-*.whl \
    && rm -rf /wheels /tmp/torch-constraint.txt \
    && kimi-grpc serve --help > /dev/null
# A fixed numeric non-root user (Kubernetes runAsNonRoot can only verify numeric users).
RUN groupadd --gid 10001 kimi \
    && useradd --uid 10001 --gid 10001 --home-dir /home/kimi --create-home --shell /usr/sbin/nologin kimi \
    && mkdir -p /models \
    && chown 10001:10001 /models
USER 10001:10001
WORKDIR /home/kimi
EXPOSE 50051 8000 9400
ENTRYPOINT ["kimi-grpc", "serve"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--http-port", "8000"]
