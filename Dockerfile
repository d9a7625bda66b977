# pyproxy's node image: `docker build -t pyproxy:dev .` (daemonset.yaml runs it).
FROM python:3.11-slim

# nft programs the capture rules; ip (iproute2) is there for inspecting them on the node.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables iproute2 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY pyproxy ./pyproxy
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /
ENTRYPOINT ["pyproxy"]
