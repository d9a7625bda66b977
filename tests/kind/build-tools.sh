#!/usr/bin/env bash
# Builds (once) the kind tier's tools from pinned sources, into ${PYPROXY_CACHE}/bin:
#   kind                               sigs.k8s.io/kind (the CLI)
#   containerd, ctr, containerd-shim-runc-v2   github.com/containerd/containerd/v2 (for the node)
#   crictl                             sigs.k8s.io/cri-tools (for the node)
#   coredns                            github.com/coredns/coredns, kubeadm's plugin set (coredns/)
#   pause                              pause.c, static (the pod sandbox)
# Kubernetes itself and etcd come from tests/realapi/build-binaries.sh (shared with the realapi
# tier). Everything is Go from the module proxy or C from this folder; nothing prebuilt is
# downloaded. Idempotent: a tool whose stamp matches is not rebuilt. Progress on stderr; the
# last stdout line is the bin directory. Cold: about 5 min on 2 cores (measured 319 s).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${PYPROXY_CACHE:-/var/cache/pyproxy}"
BIN="${CACHE}/bin"
LOG_TAG=build-tools
# shellcheck source=goenv.sh
source "${HERE}/goenv.sh"

KIND_VERSION=v0.33.0
CONTAINERD_VERSION=v2.3.7
CRICTL_VERSION=v1.37.0
COREDNS_VERSION=v1.14.6
PAUSE_VERSION=3.10.2
RECIPE=1

stamp_of() { echo "recipe=${RECIPE} $1=$2"; }
is_current() { [[ -x "${BIN}/$1" && -f "${BIN}/.$1.version" && "$(<"${BIN}/.$1.version")" == "$(stamp_of "$1" "$2")" ]]; }
mark() { stamp_of "$1" "$2" >"${BIN}/.$1.version"; }

# go_build NAME VERSION MODULE PKG... : build the packages of MODULE@VERSION into $BIN.
go_build() {
    local name="$1" version="$2" module="$3" dir
    shift 3
    dir="$(mktemp -d "${CACHE}/work.${name}.XXXXXX")"
    WORKDIRS+=("${dir}")
    log "building ${name} ${version}"
    (
        cd "${dir}"
        "${GO_BIN}" mod init "pyproxy.invalid/build-${name}" >/dev/null 2>&1
        quiet_go get "${module}@${version}"
        quiet_go build -trimpath -tags "${GO_TAGS:-}" -ldflags "-s -w ${GO_LDFLAGS:-}" -o "${BIN}/" "$@"
    )
}

build_coredns() {
    local dir
    dir="$(mktemp -d "${CACHE}/work.coredns.XXXXXX")"
    WORKDIRS+=("${dir}")
    log "building coredns ${COREDNS_VERSION} (kubeadm's plugin set)"
    cp "${HERE}/coredns/main.go.in" "${dir}/main.go"
    (
        cd "${dir}"
        "${GO_BIN}" mod init pyproxy.invalid/coredns >/dev/null 2>&1
        quiet_go get "github.com/coredns/coredns@${COREDNS_VERSION}"
        quiet_go mod tidy
        quiet_go build -trimpath -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=${COREDNS_VERSION}" -o "${BIN}/coredns" .
    )
}

WORKDIRS=()
cleanup() { local d; for d in "${WORKDIRS[@]}"; do rm -rf "${d}"; done; }

main() {
    mkdir -p "${BIN}"
    trap cleanup EXIT
    exec 9>"${CACHE}/.build.lock"
    flock 9
    local start=${SECONDS}
    if ! is_current pause "${PAUSE_VERSION}"; then
        log "building pause ${PAUSE_VERSION}"
        gcc -Os -static -o "${BIN}/pause" "${HERE}/pause.c"
        mark pause "${PAUSE_VERSION}"
    fi
    setup_go_env
    if ! is_current kind "${KIND_VERSION}"; then
        go_build kind "${KIND_VERSION}" sigs.k8s.io/kind sigs.k8s.io/kind
        mark kind "${KIND_VERSION}"
    fi
    if ! is_current crictl "${CRICTL_VERSION}"; then
        GO_LDFLAGS="-X sigs.k8s.io/cri-tools/pkg/version.Version=${CRICTL_VERSION}" \
            go_build crictl "${CRICTL_VERSION}" sigs.k8s.io/cri-tools sigs.k8s.io/cri-tools/cmd/crictl
        mark crictl "${CRICTL_VERSION}"
    fi
    if ! is_current containerd "${CONTAINERD_VERSION}"; then
        GO_TAGS="no_aufs no_zfs no_btrfs no_devmapper" \
            GO_LDFLAGS="-X github.com/containerd/containerd/v2/version.Version=${CONTAINERD_VERSION}" \
            go_build containerd "${CONTAINERD_VERSION}" github.com/containerd/containerd/v2 \
            github.com/containerd/containerd/v2/cmd/containerd \
            github.com/containerd/containerd/v2/cmd/ctr \
            github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
        mark containerd "${CONTAINERD_VERSION}"
    fi
    if ! is_current coredns "${COREDNS_VERSION}"; then
        build_coredns
        mark coredns "${COREDNS_VERSION}"
    fi
    log "tools ready ($((SECONDS - start))s)"
    echo "${BIN}"
}

main "$@"
