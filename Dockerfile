# pyproxy's node image (daemonset.yaml runs it as pyproxy:dev):
#
#   online:  docker build -t pyproxy:dev .
#   offline: docker build --network=none --build-arg BASE_IMAGE=<a local Debian/Python 3.11 image> \
#              --build-arg BUILDER_IMAGE=<the same with gcc and python3-dev> \
#              -t pyproxy:dev <context with wheels/>     (cmd/kind does this; see docs/kind.md)
#
# Two stages. The builder compiles pyproxy's wheel, C engine included (setup.py), with gcc and
# Python's headers, and collects every dependency as a wheel. The runtime stage installs those
# wheels, with no compiler and no index, and the build fails unless the engine loads there
# (`python -m pyproxy.dataplane.compiled --require`): an image never runs the twin by accident.
#
# The base is the public slim Python image, pinned; BASE_IMAGE replaces it for both stages and
# BUILDER_IMAGE for the builder alone (it must carry the same Python as BASE_IMAGE). A builder
# base without gcc (or without Python.h) gets it from apt; a runtime base that already has nft
# and ip skips apt. A `wheels/` folder in the build context makes the builder's pip work
# offline from it (pyproxy's dependencies and its build backend); without one, it uses the index.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
ARG BUILDER_IMAGE=${BASE_IMAGE}

FROM ${BUILDER_IMAGE} AS builder
RUN need=""; \
    command -v gcc >/dev/null || need="gcc libc6-dev"; \
    python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || need="$need python3-dev"; \
    if [ -n "$need" ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY . /src
# A virtualenv, so that a Debian base's system Python stays untouched (PEP 668).
RUN python3 -m venv /build \
    && if [ -d /src/wheels ]; then \
         /build/bin/pip wheel --no-cache-dir --no-index --find-links /src/wheels --wheel-dir /dist /src; \
       else \
         /build/bin/pip wheel --no-cache-dir --wheel-dir /dist /src; \
       fi \
    && ls /dist/pyproxy-*-cp*-linux_*.whl

FROM ${BASE_IMAGE}
# nft programs the capture rules; ip (iproute2) is there for inspecting them on the node.
RUN if ! command -v nft >/dev/null || ! command -v ip >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables iproute2 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=builder /dist /dist
RUN python3 -m venv /opt/pyproxy \
    && /opt/pyproxy/bin/pip install --no-cache-dir --no-index --find-links /dist pyproxy \
    && rm -rf /dist \
    && /opt/pyproxy/bin/python -m pyproxy.dataplane.compiled --require
ENV PATH=/opt/pyproxy/bin:$PATH

WORKDIR /
ENTRYPOINT ["pyproxy"]
