# The exported Production model served by MLflow's scoring server (entrypoints.serve), with the upload UI beside it.
#   make export && docker build -t fmnist:latest .
#   docker run -p 8080:8080 -p 8000:8000 fmnist:latest      # UI :8080, scoring server :8000

# --- build stage: a virtualenv with CPU-only PyTorch (~0.2 GB instead of ~5 GB of CUDA libraries) ---
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 \
 && pip install --no-cache-dir mlflow==3.17.2 numpy==2.4.6 pandas==3.1.1 pillow==13.0.0 \
        flask==3.1.3 requests==2.34.2 gunicorn==26.2.0 "psycopg[binary]==3.3.9"

# --- final stage: the venv, our code and the exported model; no compilers, no caches, not root ---
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 app
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
WORKDIR /app
COPY --chown=10001:10001 fmnist_pyfunc/ fmnist_pyfunc/
COPY --chown=10001:10001 webui/ webui/
COPY --chown=10001:10001 entrypoints/ entrypoints/
COPY --chown=10001:10001 export/ export/
USER 10001
EXPOSE 8000 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "entrypoints.container", "--export", "export", "--host", "0.0.0.0"]
