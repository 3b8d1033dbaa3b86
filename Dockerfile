# syntax=docker/dockerfile:1
# AI-Sight CPU serving image.
#
#   docker build -t aisight:dev .
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp aisight:dev
#
# Image name used by k8s/ (kustomize `images:` entries): aisight
# Configuration is by environment variables only (see docs/deploy.md).

# Same interpreter in both stages: the virtualenv built in `build` is copied
# as-is into `runtime`, so its paths and ABI must match.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, so code changes do not invalidate this layer.
COPY requirements.txt /tmp/requirements.txt
# The package index of the machine that builds (tools/image.py passes it as a secret): mounted for this
# step only, never written into a layer. Without it pip uses PyPI.
RUN --mount=type=secret,id=pipconf,target=/etc/pip.conf \
    --mount=type=secret,id=pipca \
    pip install --no-cache-dir -r /tmp/requirements.txt

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="aisight" \
      org.opencontainers.image.description="AI-Sight retinal fundus screening, CPU serving"

# Fixed numeric IDs: Kubernetes runAsNonRoot can only verify numeric users,
# and k8s/base pins the same UID/GID in its securityContext.
RUN groupadd --system --gid 10001 aisight \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp \
      --no-create-home --shell /usr/sbin/nologin aisight

# nginx in front of gunicorn (aisight/serve.py): slow clients, body cap, admission, rate limit.
# It runs as the app user with its files in /tmp, so nothing of Debian's default site is used.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/*

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# Code and model stay root-owned and read-only for the app user.
COPY app.py gunicorn.conf.py ./
COPY aisight/ aisight/
COPY training/ training/
COPY templates/ templates/
COPY static/ static/
# Alembic migrations: `flask --app app db upgrade` (the k8s migrate Job) runs from this image.
COPY migrations/ migrations/
COPY models/2.0.0/ model/
# The OpenVINO IR (the CPU fast path) is converted here from the baked-in model.keras with the venv's
# TensorFlow and OpenVINO (PATH does not name the venv yet), leaving no caches behind; then byte-compile,
# as at run time the root filesystem is read-only.
RUN /opt/venv/bin/python -m training export-openvino --model model \
 && rm -rf /root/.keras /tmp/* \
 && python -m compileall -q app.py gunicorn.conf.py aisight training

# HOME/KERAS_HOME/MPLCONFIGDIR/TMPDIR point at /tmp, the only writable place
# (an emptyDir in Kubernetes, --tmpfs /tmp with docker run --read-only).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    WEB_CONCURRENCY=2 \
    GUNICORN_THREADS=4 \
    GUNICORN_TIMEOUT=120 \
    AISIGHT_MODEL_DIR=/app/model \
    AISIGHT_MAX_UPLOAD_MB=20 \
    AISIGHT_GATE=on \
    HOME=/tmp \
    KERAS_HOME=/tmp/keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    TMPDIR=/tmp \
    TF_CPP_MIN_LOG_LEVEL=1

USER 10001:10001
EXPOSE 8000

# For plain `docker run`; Kubernetes ignores it and uses the probes in k8s/.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]

# Exec form: the supervisor is PID 1 and receives SIGTERM directly: /readyz turns 503, nginx finishes
# what it holds, then gunicorn stops (aisight/serve.py). No --preload: TensorFlow is not fork-safe, each
# worker loads the model after fork (see gunicorn.conf.py).
ENTRYPOINT ["python", "-m", "aisight.serve"]
