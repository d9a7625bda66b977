#!/usr/bin/env bash
# Builds (once) kube-proxy, the scale bench's contender (bench/rigs/scale.py), into
# ${PYPROXY_CACHE}/bin-bench/kube-proxy, from the same Kubernetes release as the realapi tier's
# kube-apiserver (tests/realapi/build-binaries.sh), in a throwaway module that replaces the
# staging modules with their published tags, from the Go module proxy only (goenv.sh).
# Its own stamp (bin-bench/.kube-proxy.versions): tests/realapi's recipe is left alone.
# Idempotent; progress on stderr; the last stdout line is the binary's path. With Kubernetes'
# packages already in the build cache: a few minutes on 2 cores.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${PYPROXY_CACHE:-/var/cache/pyproxy}"
BIN="${CACHE}/bin-bench"
K8S_VERSION="${PYPROXY_K8S_VERSION:-v1.37.2}"
RECIPE=1
WANT="recipe=${RECIPE} kubernetes=${K8S_VERSION}"
STAMP="${BIN}/.kube-proxy.versions"
LOG_TAG=build-kube-proxy
# shellcheck source=../tests/kind/goenv.sh
source "${here}/tests/kind/goenv.sh"

is_current() { [[ -x "${BIN}/kube-proxy" && -f "${STAMP}" && "$(<"${STAMP}")" == "${WANT}" ]]; }

if is_current; then
    echo "${BIN}/kube-proxy"
    exit 0
fi

WORKDIR=""
cleanup() { [[ -z "${WORKDIR}" ]] || rm -rf "${WORKDIR}"; rm -f "${BIN}/kube-proxy.new"; }


main() {
    mkdir -p "${BIN}"
    trap cleanup EXIT
    exec 9>"${CACHE}/.build-kube-proxy.lock"
    flock 9
    if is_current; then echo "${BIN}/kube-proxy"; return 0; fi
    setup_go_env
    local start=${SECONDS} v="${K8S_VERSION#v}" flags="-s -w" pkg
    WORKDIR="$(mktemp -d "${CACHE}/work.kube-proxy.XXXXXX")"
    write_k8s_module "${WORKDIR}" build-kube-proxy
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
        flags+=" -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=${v%%.*}"
        flags+=" -X ${pkg}.gitMinor=$(echo "${v}" | cut -d. -f2) -X ${pkg}.gitTreeState=clean"
    done
    log "building kube-proxy ${K8S_VERSION}"
    (
        cd "${WORKDIR}"
        quiet_go get "k8s.io/kubernetes@${K8S_VERSION}"
        # Same tags as the upstream release build (hack/lib/golang.sh).
        quiet_go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags "${flags}" \
            -o "${BIN}/kube-proxy.new" k8s.io/kubernetes/cmd/kube-proxy
    )
    mv -f "${BIN}/kube-proxy.new" "${BIN}/kube-proxy"
    echo "${WANT}" >"${STAMP}"
    log "$("${BIN}/kube-proxy" --version) built in $((SECONDS - start))s"
    echo "${BIN}/kube-proxy"
}

main "$@"
