# mailbridge: the same install steps as scripts/run.sh (pip install .), run as a non-root user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BRIDGE_DATABASE_URL=sqlite:////data/bridge.db

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY migrations ./migrations
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /data bridge \
    && mkdir -p /data && chown bridge /data && chmod 700 /data

USER bridge
WORKDIR /data
VOLUME /data
CMD ["mailbridge", "run"]
