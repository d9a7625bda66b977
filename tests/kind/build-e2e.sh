#!/usr/bin/env bash
# Builds (once) Kubernetes' own e2e suite and what it runs, into ${PYPROXY_CACHE}/bin-e2e:
#   e2e.test   k8s.io/kubernetes/test/e2e, compiled as a test binary (go test -c)
#   ginkgo     github.com/onsi/ginkgo/v2/ginkgo at the version Kubernetes' go.mod requires
#              (runs the specs in parallel processes)
#   agnhost    k8s.io/kubernetes/test/images/agnhost (the specs' workhorse image; its root fs
#              is made by tests/kind/e2e.py)
#   regression-issue-74839  k8s.io/kubernetes/test/images/regression-issue-74839 (the
#              invalid-conntrack-state spec's server, which injects out-of-window segments)
# From the same Kubernetes release as the rest of the cluster (tests/realapi/build-binaries.sh),
# in a throwaway module that replaces the staging modules with their published tags, from
# the Go module proxy only. Idempotent (a stamp per recipe); progress on stderr; the last
# stdout line is the bin directory. Cold, with Kubernetes' packages already in the build
# cache: about 6 to 10 minutes on 2 cores.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${PYPROXY_CACHE:-/var/cache/pyproxy}"
BIN="${CACHE}/bin-e2e"
K8S_VERSION="${PYPROXY_K8S_VERSION:-v1.37.2}"
RECIPE=2
WANT="recipe=${RECIPE} kubernetes=${K8S_VERSION}"
STAMP="${BIN}/.versions"
LOG_TAG=build-e2e
# shellcheck source=goenv.sh
source "${HERE}/goenv.sh"

is_current() {
    local b
    for b in e2e.test ginkgo agnhost regression-issue-74839; do [[ -x "${BIN}/${b}" ]] || return 1; done
    [[ -f "${STAMP}" && "$(<"${STAMP}")" == "${WANT}" ]]
}

if is_current; then
    echo "${BIN}"
    exit 0
fi

WORKDIRS=()
cleanup() { local d; for d in "${WORKDIRS[@]}"; do rm -rf "${d}"; done; rm -rf "${BIN}/new"; }

write_module() {
    write_k8s_module "$1" build-e2e
    GINKGO_VERSION="$(sed -n 's|^[[:space:]]*github.com/onsi/ginkgo/v2 \(v[^ ]*\).*|\1|p' "${K8S_GOMOD}" | head -n 1)"
    [[ -n "${GINKGO_VERSION}" ]] || { log "cannot read ginkgo's version from ${K8S_GOMOD}"; exit 1; }
}

main() {
    mkdir -p "${BIN}"
    trap cleanup EXIT
    exec 9>"${CACHE}/.build.lock"
    flock 9
    if is_current; then echo "${BIN}"; return 0; fi
    setup_go_env
    local start=${SECONDS} dir
    dir="$(mktemp -d "${CACHE}/work.e2e.XXXXXX")"
    WORKDIRS+=("${dir}")
    rm -rf "${BIN}/new"
    mkdir -p "${BIN}/new"
    write_module "${dir}"
    log "building e2e.test, agnhost, regression-issue-74839 and ginkgo ${GINKGO_VERSION} from Kubernetes ${K8S_VERSION}"
    (
        cd "${dir}"
        quiet_go get "k8s.io/kubernetes@${K8S_VERSION}"
        quiet_go get "github.com/onsi/ginkgo/v2@${GINKGO_VERSION}"
        local flags="-s -w -X k8s.io/component-base/version.gitVersion=${K8S_VERSION}"
        flags+=" -X k8s.io/client-go/pkg/version.gitVersion=${K8S_VERSION}"
        quiet_go test -c -trimpath -ldflags "${flags}" -o "${BIN}/new/e2e.test" k8s.io/kubernetes/test/e2e
        quiet_go build -trimpath -ldflags "-s -w" -o "${BIN}/new/agnhost" k8s.io/kubernetes/test/images/agnhost
        quiet_go build -trimpath -ldflags "-s -w" -o "${BIN}/new/regression-issue-74839" \
            k8s.io/kubernetes/test/images/regression-issue-74839
        quiet_go build -trimpath -ldflags "-s -w" -o "${BIN}/new/ginkgo" github.com/onsi/ginkgo/v2/ginkgo
    )
    local b
    for b in e2e.test agnhost regression-issue-74839 ginkgo; do mv -f "${BIN}/new/${b}" "${BIN}/${b}"; done
    # agnhost's porter serves TLS with the certificate the image carries at /localhost.{crt,key}
    cp "${GOMODCACHE}/k8s.io/kubernetes@${K8S_VERSION}/test/images/agnhost/porter/localhost.crt" \
       "${GOMODCACHE}/k8s.io/kubernetes@${K8S_VERSION}/test/images/agnhost/porter/localhost.key" "${BIN}/"
    chmod u+w "${BIN}/localhost.crt" "${BIN}/localhost.key"
    echo "${WANT}" >"${STAMP}"
    log "built in $((SECONDS - start))s"
    echo "${BIN}"
}

main "$@"
