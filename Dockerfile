# mailbridge: the same install steps as scripts/run.sh (pip install .), run as a non-root user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BRIDGE_DATABASE_URL=sqlite:////data/bridge.db

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY migrations ./migrations
COPY deploy/healthcheck.py ./healthcheck.py
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /data bridge \
    && mkdir -p /data && chown bridge /data && chmod 700 /data

USER bridge
WORKDIR /data
VOLUME /data
# With BRIDGE_HTTP__LISTEN (e.g. 0.0.0.0:8080) set, the container is healthy while /healthz
# answers 200: every folder connected, Telegram answering, the database reachable. Unset: the
# check passes while the process runs. Python's urllib, as the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
CMD ["mailbridge", "run"]
