# ZoneMTA-py: the image of one service, chosen with SERVICE (ingest, queue, sender, bounce or api).
# Build from the repository root (`make images` builds all five):
#   docker build --build-arg SERVICE=ingest -f Dockerfile -t zonemta-py/ingest:0.1.0 .
# The base is pinned by its full version tag; pass --build-arg PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:...
# to pin it by digest as well.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
ARG SERVICE

# Build: a virtualenv with this service's distribution and zmta-common, nothing else
# (every dependency has a binary wheel: no compiler needed). Without pip or setuptools.
FROM ${PYTHON_IMAGE} AS build
ARG SERVICE
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN case "$SERVICE" in ingest|queue|sender|bounce|api) ;; \
        *) echo "--build-arg SERVICE=ingest|queue|sender|bounce|api, not '$SERVICE'" >&2; exit 1;; esac \
    && python -m venv --without-pip /opt/zmta
WORKDIR /src
# The lock's lines that this service needs (tagged with its name), each file checked against its
# hash; then the two distributions themselves, whose dependencies those are (pip check: all there).
COPY constraints.txt ./
RUN grep -E "# for:( [a-z]+)* ${SERVICE}( |\$)" constraints.txt > requirements.txt \
    && pip --python /opt/zmta/bin/python install --require-hashes -r requirements.txt
COPY libs/common libs/common
COPY services/${SERVICE} services/${SERVICE}
RUN pip --python /opt/zmta/bin/python install --no-deps ./libs/common ./services/${SERVICE} \
    && pip --python /opt/zmta/bin/python check

# Run: the same Python, the virtualenv, an unprivileged user; what differs between the services
# is in the stages after this one.
FROM ${PYTHON_IMAGE} AS run
ARG SERVICE
LABEL org.opencontainers.image.title="zonemta-py-${SERVICE}"
RUN groupadd --system --gid 10001 zmta \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin zmta
COPY --from=build /opt/zmta /opt/zmta
ENV PATH=/opt/zmta/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# /health on the metrics port, or on the API port for api (ZMTA_HEALTH_PORT when the config moves
# it; needs the service to listen on 127.0.0.1 or 0.0.0.0). Kubernetes uses its own probes instead.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['ZMTA_HEALTH_PORT'], timeout=2)"]

FROM run AS service-ingest
LABEL org.opencontainers.image.description="ZoneMTA-py ingest: SMTP intake"
ENV ZMTA_HEALTH_PORT=12091
EXPOSE 2525 12091
ENTRYPOINT ["python", "-m", "zmta_ingest"]

FROM run AS service-queue
LABEL org.opencontainers.image.description="ZoneMTA-py queue: scheduling: leases, results, housekeeping"
ENV ZMTA_HEALTH_PORT=12092
EXPOSE 12092
ENTRYPOINT ["python", "-m", "zmta_queue"]

FROM run AS service-sender
LABEL org.opencontainers.image.description="ZoneMTA-py sender: delivery for one sending zone"
ENV ZMTA_HEALTH_PORT=12093
EXPOSE 12093
ENTRYPOINT ["python", "-m", "zmta_sender"]

FROM run AS service-bounce
LABEL org.opencontainers.image.description="ZoneMTA-py bounce: bounce classification and notifications"
ENV ZMTA_HEALTH_PORT=12094
EXPOSE 12094
ENTRYPOINT ["python", "-m", "zmta_bounce"]

FROM run AS service-api
LABEL org.opencontainers.image.description="ZoneMTA-py api: HTTP API"
ENV ZMTA_HEALTH_PORT=12080
EXPOSE 12080
ENTRYPOINT ["python", "-m", "zmta_api"]

# The image: the stage of the service asked for (only its stages are built).
FROM service-${SERVICE}
