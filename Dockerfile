# syntax=docker/dockerfile:1
# chat-api container image.
#
#   docker build -t chat-api .
#   docker run --rm -p 5000:5000 -e CHAT_API_DEMO=1 chat-api
#
# Two stages: `build` installs the pinned dependencies and the chat-api wheel
# into a virtual environment; `runtime` copies only that environment onto a
# fresh slim image, so no compiler, pip or build backend ships in the result.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/chat-api
WORKDIR /src
# Dependencies first: this layer is reused until requirements.lock changes.
COPY requirements.lock ./
RUN /opt/chat-api/bin/pip install --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/chat-api/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && /opt/chat-api/bin/pip install --no-deps /tmp/wheels/chat_api-*.whl \
    && /opt/chat-api/bin/python -m pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="chat-api" \
      org.opencontainers.image.description="A gateway to OpenAI chat models that keeps the operator's key on the server." \
      org.opencontainers.image.licenses="MIT"
# Containers listen on every address; the port is the one EXPOSEd below.
# The SQLite default lives on /data (mount a volume there); shared
# deployments set CHAT_API_DATABASE_URL to PostgreSQL instead.
ENV PATH=/opt/chat-api/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHAT_API_HOST=0.0.0.0 \
    CHAT_API_PORT=5000 \
    CHAT_API_LOG_FORMAT=json \
    CHAT_API_DATABASE_URL=sqlite+aiosqlite:////data/chat-api.db
RUN groupadd --system --gid 10001 chat-api \
    && useradd --system --uid 10001 --gid chat-api --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin chat-api \
    && mkdir -p /app /data \
    && chown chat-api:chat-api /data
COPY --from=build /opt/chat-api /opt/chat-api
COPY gunicorn.conf.py /app/gunicorn.conf.py
WORKDIR /app
USER 10001:10001
EXPOSE 5000
# uvicorn stops accepting on SIGTERM and lets open streams finish for
# CHAT_API_SHUTDOWN_GRACE seconds; give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CHAT_API_PORT', '5000'), timeout=2)"]
# One uvicorn process per container: scale with replicas, not workers.
# The original two-worker shape is `gunicorn -c gunicorn.conf.py`.
CMD ["chat-api", "serve"]
