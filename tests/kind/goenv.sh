# Sourced by the Go build scripts (tests/realapi/build-binaries.sh, tests/kind/build-tools.sh).
# Sets the Go environment for offline-safe, cached builds under $CACHE:
#   GOMODCACHE, GOCACHE, GOPATH in the cache; GOTOOLCHAIN=local; CGO off;
#   GOPROXY = the configured module proxy without the "direct" fallback (a direct fetch would
#   try modules' own hosts, which are unreachable here and must not be tried).
# Defines GO_BIN and log(); expects CACHE and LOG_TAG to be set.

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
