#!/usr/bin/env bash
# Installs (once, cached) the peers of `make bench` that Debian does not package, and prints
# where they are. Used by tests/bench/run.sh; a peer that cannot be installed is skipped with
# the reason, never failing the bench.
#   Haraka  npm package Haraka@$HARAKA_VERSION (needs node with its npm: `make bench` installs them)
#   maddy   Go module github.com/foxcpp/maddy@$MADDY_VERSION, built like tests/cluster/build.sh
#           (CGO off, -trimpath, the machine's Go); its sqlite storage is not needed for relaying
# Cache: ${PARTNERGATE_CACHE:-$HOME/.cache/partnergate}/{haraka,maddy}-<version>/
#
# Usage: tests/bench/peers.sh haraka|maddy...
#   prints one line per peer: `<name> <executable>` or `<name> skip <reason>`
set -uo pipefail

HARAKA_VERSION=${HARAKA_VERSION:-3.3.4}
MADDY_VERSION=${MADDY_VERSION:-v0.8.1}
CACHE=${PARTNERGATE_CACHE:-$HOME/.cache/partnergate}

haraka() {
  local dir=$CACHE/haraka-$HARAKA_VERSION bin
  bin=$dir/node_modules/Haraka/bin/haraka
  if [ ! -x "$bin" ]; then
    command -v npm >/dev/null || { echo "haraka skip npm not found (tests/scripts/install-deps.sh --bench installs node)"; return; }
    mkdir -p "$dir"
    echo "peers: npm install Haraka@$HARAKA_VERSION into $dir" >&2
    (cd "$dir" && npm install --no-audit --no-fund --omit=optional "Haraka@$HARAKA_VERSION" >&2) || {
      echo "haraka skip npm install Haraka@$HARAKA_VERSION failed"
      return
    }
  fi
  [ -x "$bin" ] && echo "haraka $bin" || echo "haraka skip $bin missing after install"
}

maddy() {
  local dir=$CACHE/maddy-$MADDY_VERSION
  local bin=$dir/bin/maddy src
  if [ ! -x "$bin" ]; then
    command -v go >/dev/null || { echo "maddy skip go not found"; return; }
    echo "peers: building github.com/foxcpp/maddy/cmd/maddy@$MADDY_VERSION with $(go version)" >&2
    # Built as the main module (a copy of its source), so its go.mod's replace directives (forks
    # of go-imap and go-smtp) apply; `go install pkg@version` also asks the proxy for the
    # module's version list, which it refuses for this module.
    src=$(CGO_ENABLED=0 go mod download -json "github.com/foxcpp/maddy@$MADDY_VERSION" |
      sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
    if [ -z "$src" ] || [ ! -d "$src" ]; then
      echo "maddy skip go mod download github.com/foxcpp/maddy@$MADDY_VERSION failed"
      return
    fi
    rm -rf "$dir/src"
    mkdir -p "$dir/bin"
    cp -r "$src" "$dir/src"
    chmod -R u+w "$dir/src"
    if ! (cd "$dir/src" && CGO_ENABLED=0 GOFLAGS="-trimpath -buildvcs=false" \
      nice -n 10 go build -ldflags '-s -w' -o "$bin.tmp" ./cmd/maddy >&2); then
      echo "maddy skip github.com/foxcpp/maddy@$MADDY_VERSION does not build with $(go version | cut -d' ' -f3)"
      return
    fi
    mv -f "$bin.tmp" "$bin"
  fi
  echo "maddy $bin"
}

for p in "$@"; do
  case $p in
    haraka) haraka ;;
    maddy) maddy ;;
    *) echo "$p skip unknown peer" ;;
  esac
done
