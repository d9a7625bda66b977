# Sourced by the Go build scripts (tests/realapi/build-binaries.sh, tests/kind/build-tools.sh,
# tests/kind/build-e2e.sh, bench/build-kube-proxy.sh).
# Sets the Go environment for offline-safe, cached builds under $CACHE:
#   GOMODCACHE, GOCACHE, GOPATH in the cache; GOTOOLCHAIN=local; CGO off;
#   GOPROXY = the configured module proxy without the "direct" fallback (a direct fetch would
#   try modules' own hosts, which are unreachable here and must not be tried).
# Defines GO_BIN, log() and write_k8s_module(); expects CACHE and LOG_TAG to be set.

log() { printf '[%s] %s\n' "${LOG_TAG}" "$*" >&2; }

find_go() {
    if [[ -n "${GO:-}" ]]; then
        echo "${GO}"
    elif command -v go >/dev/null 2>&1; then
        command -v go
    elif [[ -x /usr/local/go/bin/go ]]; then
        echo /usr/local/go/bin/go
    else
        log "no go toolchain found (set GO=/path/to/go)"
        exit 1
    fi
}

setup_go_env() {
    GO_BIN="$(find_go)"
    if ! "${GO_BIN}" version >/dev/null 2>&1; then
        log "go toolchain ${GO_BIN} does not run"
        exit 1
    fi
    export GOMODCACHE="${CACHE}/gomod"
    export GOCACHE="${CACHE}/gocache"
    export GOPATH="${CACHE}/gopath"
    export GOFLAGS="-mod=mod -buildvcs=false"
    export GOTOOLCHAIN=local
    export CGO_ENABLED=0
    GOPROXY="$("${GO_BIN}" env GOPROXY | sed 's/,direct$//; s/|direct$//')"
    export GOPROXY
    mkdir -p "${GOMODCACHE}" "${GOCACHE}" "${GOPATH}"
    log "using $("${GO_BIN}" version)"
}

# go get's per-module chatter ("go: upgraded ...", "go: downloading ...") is hundreds of lines
# that say nothing to a reader; errors still come through.
# (pipefail makes go's own exit status the function's.)
quiet_go() {
    "${GO_BIN}" "$@" 2>&1 | { grep -v '^go: \(upgraded\|added\|downloading\|finding\)' >&2 || true; }
}

# v1.37.2 -> v0.37.2: the published tag of Kubernetes' staging modules (k8s.io/api, ...).
staging_version() {
    local v="${K8S_VERSION#v}"
    echo "v0.${v#*.}"
}

# write_k8s_module DIR NAME: a throwaway module pyproxy.invalid/NAME in DIR that requires
# k8s.io/kubernetes at K8S_VERSION and replaces each module its go.mod maps to ./staging with
# the published tag (Kubernetes itself cannot be required otherwise). Sets K8S_GOMOD to the
# path of Kubernetes' own go.mod in the module cache, for what else a caller reads from it.
write_k8s_module() {
    local dir="$1" name="$2" sv staging m
    sv="$(staging_version)"
    (cd "${dir}" && "${GO_BIN}" mod init "pyproxy.invalid/${name}" >/dev/null 2>&1)
    K8S_GOMOD="$(cd "${dir}" && "${GO_BIN}" mod download -json "k8s.io/kubernetes@${K8S_VERSION}" |
        sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    [[ -f "${K8S_GOMOD}" ]] || { log "cannot download k8s.io/kubernetes@${K8S_VERSION}"; exit 1; }
    staging="$(sed -n 's|^[[:space:]]*\(k8s.io/[A-Za-z0-9._-]*\) => \./staging/.*|\1|p' "${K8S_GOMOD}")"
    [[ -n "${staging}" ]] || { log "no staging replaces found in ${K8S_GOMOD}"; exit 1; }
    {
        echo
        echo "require k8s.io/kubernetes ${K8S_VERSION}"
        echo
        echo "replace ("
        for m in ${staging}; do echo "	${m} => ${m} ${sv}"; done
        echo ")"
    } >>"${dir}/go.mod"
}
