# One image for the exporter, the API (gunicorn) and the workload simulator; docker-compose.yml
# picks the command per service. Data (event logs, the SQLite task database, the exporter's
# state) lives in /app/data, a volume. /app/alertmanager-config is where the compose service
# alertmanager-config renders Alertmanager's configuration (a volume Alertmanager mounts).
# Pinned to a patch release and a Debian release, so a rebuild gets the same interpreter.
FROM python:3.12.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
COPY api/ api/
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin aicrm \
    && mkdir -p /app/data /app/alertmanager-config \
    && chown aicrm:aicrm /app/data /app/alertmanager-config
COPY config.json ./

USER aicrm
ENV AICRM_CONFIG=/app/config.json \
    AICRM_HEALTH_URL=http://127.0.0.1:9464/healthz
VOLUME ["/app/data"]
EXPOSE 9464 5000

# The exporter's /healthz by default; the API service sets AICRM_HEALTH_URL to its own.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen(os.environ['AICRM_HEALTH_URL'], timeout=4).status != 200)"]

CMD ["aicrm-exporter", "--config", "/app/config.json", "--listen", "0.0.0.0:9464"]
