# The exported Production model behind the scoring server (entrypoints.serve, :5001) and the upload UI (:8000).
#   make image                 # make export, then container/build.py: docker if its daemon runs, else podman
#   docker run --read-only --tmpfs /tmp -p 127.0.0.1:5001:5001 -p 127.0.0.1:8000:8000 fmnist:latest
# Plain `docker build -t fmnist:latest .` works too, after `make export`.

# One stage: the venv is all the build adds (no compilers, no caches), so a second stage would only copy it.
FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv && useradd --create-home --uid 10001 app
ENV PATH=/opt/venv/bin:$PATH
# The venv holds exactly pyproject.toml's [project] dependencies (container/requirements.py lists them).
# container/wheelhouse holds wheels only for offline builds (container/build.py --offline: what the host's pip
# resolves; where its index has only PyPI's CUDA build of torch, ~3 GB more). Empty: CPU-only torch from
# PyTorch's index (~0.2 GB instead of ~3 GB of CUDA libraries), the rest from PyPI.
# The dependency list is COPYed, not bind-mounted: a layer's cache key covers what earlier layers copied, and
# podman's (buildah's) does not cover bind mounts, so a changed list would otherwise reuse the old venv.
COPY pyproject.toml container/requirements.py /build/
RUN --mount=type=bind,source=container/wheelhouse,target=/build/wheelhouse \
    python /build/requirements.py /build/pyproject.toml > /tmp/requirements.txt \
 && if ls /build/wheelhouse/*.whl >/dev/null 2>&1; then \
      pip install --no-cache-dir --no-index --find-links /build/wheelhouse -r /tmp/requirements.txt; \
    else \
      pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "$(grep '^torch==' /tmp/requirements.txt)" \
      && pip install --no-cache-dir -r /tmp/requirements.txt; \
    fi \
 && rm /tmp/requirements.txt
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
# Our code and the model, root-owned: the app (uid 10001) can read, not change them.
WORKDIR /app
COPY fmnist_pyfunc/ fmnist_pyfunc/
COPY webui/ webui/
COPY entrypoints/ entrypoints/
COPY export/ export/
ARG SOURCE_URL=""
ARG REVISION=""
ARG MODEL_NAME=""
ARG MODEL_VERSION=""
ARG MODEL_RUN_ID=""
LABEL org.opencontainers.image.title="fmnist" \
      org.opencontainers.image.description="Fashion-MNIST classifier: MLflow scoring server and upload UI" \
      org.opencontainers.image.source="$SOURCE_URL" \
      org.opencontainers.image.revision="$REVISION" \
      fmnist.model.name="$MODEL_NAME" \
      fmnist.model.version="$MODEL_VERSION" \
      fmnist.model.run-id="$MODEL_RUN_ID"
USER 10001
EXPOSE 5001 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "entrypoints.container", "--export", "export", "--host", "0.0.0.0"]
