# pyproxy's node image (daemonset.yaml runs it as pyproxy:dev):
#
#   online:  docker build -t pyproxy:dev .
#   offline: docker build --network=none --build-arg BASE_IMAGE=<a local Debian/Python 3.11 image> \
#              -t pyproxy:dev <context with wheels/>     (cmd/kind does this; see README)
#
# The base is the public slim Python image, pinned; BASE_IMAGE replaces it. A base that already
# has nft and ip skips apt. A `wheels/` folder in the build context makes pip install offline
# from it (pyproxy's dependencies and its build backend); without one, pip uses the index.
# The compiled helpers (pyproxy/dataplane/_*.so, built on the host by cmd/setup) are installed
# with the package when the context has them; the image has no compiler. The last step reports
# whether each loads here (a library built for another Python falls back to its pure-Python
# twin); --build-arg REQUIRE_NATIVE=1 (cmd/kind) fails the build unless all of them do.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}
ARG REQUIRE_NATIVE=0

# nft programs the capture rules; ip (iproute2) is there for inspecting them on the node.
RUN if ! command -v nft >/dev/null || ! command -v ip >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables iproute2 \
        && rm -rf /var/lib/apt/lists/*; \
    fi

COPY . /src
# A virtualenv, so that a Debian base's system Python stays untouched (PEP 668).
RUN python3 -m venv /opt/pyproxy \
    && if [ -d /src/wheels ]; then \
         /opt/pyproxy/bin/pip install --no-cache-dir --no-index --find-links /src/wheels /src; \
       else \
         /opt/pyproxy/bin/pip install --no-cache-dir /src; \
       fi \
    && rm -rf /src \
    && /opt/pyproxy/bin/python -m pyproxy.dataplane.compiled $([ "$REQUIRE_NATIVE" = 1 ] && echo --require)
ENV PATH=/opt/pyproxy/bin:$PATH

WORKDIR /
ENTRYPOINT ["pyproxy"]
