#!/usr/bin/env bash
# Builds the bench's C/Go load generators that Debian does not package here, from the Go
# module proxy (tests/kind/goenv.sh's environment), into $CACHE/bin-bench (cached: a binary
# already there is kept). wrk and iperf3 come from Debian (bench/apt-packages.txt).
#   fortio (fixed-rate HTTP load with latency percentiles): fortio.org/fortio@$FORTIO_VERSION
#   (v1.65.0: later ones need grol.io modules the module proxy here refuses with 403)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${PYPROXY_CACHE:-/var/cache/pyproxy}"
LOG_TAG=bench-tools
FORTIO_VERSION="${FORTIO_VERSION:-v1.65.0}"
# shellcheck source=../tests/kind/goenv.sh
source "${here}/tests/kind/goenv.sh"
bin="${CACHE}/bin-bench"
mkdir -p "${bin}"
if [[ -x "${bin}/fortio" ]]; then
    log "fortio cached: ${bin}/fortio"
    exit 0
fi
setup_go_env
log "building fortio.org/fortio@${FORTIO_VERSION}"
GOBIN="${bin}" "${GO_BIN}" install "fortio.org/fortio@${FORTIO_VERSION}" >&2
log "built ${bin}/fortio"
