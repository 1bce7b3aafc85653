# The sidecar image the Helm chart runs (helm/sidecar, image.repository).
# Build from the repository root: docker build -t REGISTRY/sidecar:VERSION .
# It is kept minimal because the project's CI has no container engine to build and test it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The package and its runtime dependencies only; .dockerignore admits just what the build needs.
COPY . /src
RUN pip install /src && rm -rf /src

# A fixed numeric user, so that the chart's runAsUser and fsGroup match it. The working
# directory holds the outbox; the chart mounts a writable volume there.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/sidecar \
       --shell /usr/sbin/nologin sidecar \
    && mkdir -p /var/lib/sidecar /etc/sidecar \
    && chown 10001:10001 /var/lib/sidecar
WORKDIR /var/lib/sidecar
USER 10001:10001

# HTTP (metrics, probes, alert webhook), OTLP/HTTP, StatsD.
EXPOSE 9464 4318 8125/udp

ENTRYPOINT ["sidecar"]
CMD ["run"]
