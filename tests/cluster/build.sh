#!/usr/bin/env bash
# Build (once) and cache the test control plane binaries from published Go modules:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, helm,
#   kube-proxy, cert-manager-controller and cmctl (plus cert-manager's CRDs, from the same
#   module), and coredns (only the plugins the cluster DNS uses).
# Versions come from versions.env. Binaries are cached outside the repo under
#   ${PARTNERGATE_CACHE:-$HOME/.cache/partnergate}/{k8s,etcd,helm,cert-manager,coredns}-<version>/bin/
# and a directory of symlinks to all of them (and to cert-manager.crds.yaml) is kept at
#   ${PARTNERGATE_CACHE:-$HOME/.cache/partnergate}/bin/k8s-<v>_etcd-<v>_helm-<v>_cert-manager-<v>/
#
# Usage:
#   tests/cluster/build.sh                  build what is missing, print each binary's path
#   tests/cluster/build.sh --print-bin-dir  same (progress on stderr), then print only the
#                                           symlink directory on stdout, e.g.
#                                             BIN=$(tests/cluster/build.sh --print-bin-dir)
#   tests/cluster/build.sh --check          exit 0 if everything is cached, 1 otherwise (no build)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$HERE/versions.env"

mode=build
case "${1:-}" in
  "") ;;
  --print-bin-dir) mode=print ;;
  --check) mode=check ;;
  -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
  *) echo "build.sh: unknown argument: $1" >&2; exit 2 ;;
esac

CACHE=${PARTNERGATE_CACHE:-$HOME/.cache/partnergate}
K8S_DIR=$CACHE/k8s-$K8S_VERSION
ETCD_DIR=$CACHE/etcd-$ETCD_VERSION
HELM_DIR=$CACHE/helm-$HELM_VERSION
CM_DIR=$CACHE/cert-manager-$CERT_MANAGER_VERSION
DNS_DIR=$CACHE/coredns-$COREDNS_VERSION
BIN_DIR=$CACHE/bin/k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}_cert-manager-${CERT_MANAGER_VERSION}
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kube-proxy)
# binary name -> package under github.com/cert-manager/cert-manager/cmd
declare -A CM_PKG=([cert-manager-controller]=controller [cmctl]=ctl)
CM_BINS=(cert-manager-controller cmctl)
CM_CRDS=$CM_DIR/crds/cert-manager.crds.yaml

# name -> cached path
declare -A BIN_PATH=([etcd]=$ETCD_DIR/bin/etcd [helm]=$HELM_DIR/bin/helm [coredns]=$DNS_DIR/bin/coredns)
for b in "${K8S_BINS[@]}"; do BIN_PATH[$b]=$K8S_DIR/bin/$b; done
for b in "${CM_BINS[@]}"; do BIN_PATH[$b]=$CM_DIR/bin/$b; done
ALL_BINS=(etcd "${K8S_BINS[@]}" helm "${CM_BINS[@]}" coredns)

all_cached() {
  local b
  for b in "${ALL_BINS[@]}"; do [ -x "${BIN_PATH[$b]}" ] || return 1; done
  for b in "${ALL_BINS[@]}"; do [ "$(readlink "$BIN_DIR/$b" 2>/dev/null)" = "${BIN_PATH[$b]}" ] || return 1; done
  [ -s "$CM_CRDS" ] && [ "$(readlink "$BIN_DIR/cert-manager.crds.yaml" 2>/dev/null)" = "$CM_CRDS" ]
}

if [ "$mode" = check ]; then all_cached; exit; fi
if [ "$mode" = print ]; then
  if all_cached; then echo "$BIN_DIR"; exit 0; fi
  exec 3>&1 1>&2   # progress to stderr, the directory alone to stdout
fi

# ---- build environment -------------------------------------------------------------------------
if [ -n "${GO_TOOLCHAIN:-}" ]; then export GOTOOLCHAIN=$GO_TOOLCHAIN; fi
export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false"
command -v go >/dev/null || { echo "build.sh: 'go' not found in PATH" >&2; exit 1; }
GO=(nice -n 10 go)   # a 2-core box shared with Rust builds

mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
if ! flock -n 9; then
  echo "build.sh: another build holds $CACHE/.build.lock; waiting ..."
  flock 9
fi

TOTAL_START=$SECONDS
fmt_secs() { printf '%ds' "$1"; }

# build_one NAME VERSION DEST CMD...: skip if DEST is cached, else run CMD (in a subshell with
# errexit), which must write the binary to "$TMP_OUT"; then move it into place atomically.
build_one() {
  local name=$1 version=$2 dest=$3; shift 3
  if [ -x "$dest" ]; then echo "cached: $name $version -> $dest"; return 0; fi
  mkdir -p "$(dirname "$dest")"
  rm -f "$dest".tmp.*   # leftovers of an interrupted build (we hold the lock)
  TMP_OUT=$(mktemp "$dest.tmp.XXXXXX")
  local start=$SECONDS rc took log
  log=$(dirname "$(dirname "$dest")")/build-$name.log
  printf 'building %s %s ... ' "$name" "$version"
  set +e
  ( set -e; "$@" ) >"$log" 2>&1
  rc=$?
  set -e
  took=$((SECONDS - start))
  if [ "$rc" -ne 0 ] || [ ! -s "$TMP_OUT" ]; then
    echo "FAILED after $(fmt_secs "$took") (exit $rc)"
    echo "---- last 40 lines of $log ----"
    tail -n 40 "$log"
    rm -f "$TMP_OUT"
    exit 1
  fi
  chmod 0755 "$TMP_OUT"
  mv -f "$TMP_OUT" "$dest"
  echo "done in $(fmt_secs "$took")"
  echo "$(date -u +%FT%TZ) $name $version ${took}s nproc=$(nproc)" >>"$(dirname "$(dirname "$dest")")/build-times.txt"
}

# ---- etcd --------------------------------------------------------------------------------------
etcd_prepare() {
  local src=$ETCD_DIR/src
  mkdir -p "$src"
  if [ ! -f "$src/.ready" ]; then
    cat >"$src/go.mod" <<EOF
module partnergate.local/etcd-build

go 1.26.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
    cat >"$src/tools.go" <<'EOF'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
EOF
    rm -f "$src/go.sum"
    (cd "$src" && "${GO[@]}" mod tidy)
    touch "$src/.ready"
  fi
}
etcd_build() {
  etcd_prepare
  cd "$ETCD_DIR/src"
  "${GO[@]}" build -ldflags '-s -w' -o "$TMP_OUT" go.etcd.io/etcd/server/v3
}

# ---- kubernetes --------------------------------------------------------------------------------
k8s_prepare() {
  local src=$K8S_DIR/src b
  mkdir -p "$src"
  if [ -f "$src/.ready" ]; then
    # A binary added to K8S_BINS after the module was prepared (kube-proxy) needs its imports in
    # tools.go and go.sum: prepare again (a warm module cache makes that a few seconds).
    for b in "${K8S_BINS[@]}"; do
      grep -q "k8s.io/kubernetes/cmd/$b\"" "$src/tools.go" 2>/dev/null || { rm -f "$src/.ready"; break; }
    done
    [ -f "$src/.ready" ] && return 0
  fi
  local json gomod
  json=$("${GO[@]}" mod download -json "k8s.io/kubernetes@$K8S_VERSION")
  gomod=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [ -f "$gomod" ] || { echo "cannot find go.mod of k8s.io/kubernetes@$K8S_VERSION"; return 1; }
  # Staging modules: replaced with ./staging/src/... in k8s.io/kubernetes' go.mod AND required by it.
  local replaced required staging
  replaced=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod" | sort -u)
  required=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]\{1,\}v0\.0\.0\([[:space:]].*\)\{0,1\}$#\1#p' "$gomod" | sort -u)
  staging=$(comm -12 <(printf '%s\n' "$replaced") <(printf '%s\n' "$required"))
  [ -n "$staging" ] || { echo "found no staging modules in $gomod"; return 1; }
  {
    echo "module partnergate.local/k8s-build"
    echo
    echo "go 1.26.0"
    echo
    echo "godebug default=go1.26"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    local m
    for m in $staging; do echo "	$m => $m $K8S_STAGING_VERSION"; done
    echo ")"
  } >"$src/go.mod"
  {
    echo "//go:build tools"
    echo
    echo "package tools"
    echo
    echo "import ("
    local b
    for b in "${K8S_BINS[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$b\""; done
    echo ")"
  } >"$src/tools.go"
  rm -f "$src/go.sum"
  echo "staging modules replaced with $K8S_STAGING_VERSION: $(echo $staging)"
  (cd "$src" && "${GO[@]}" mod tidy)
  touch "$src/.ready"
}
k8s_ldflags() {
  local v=${K8S_VERSION#v} major minor date info pkg flags="-s -w"
  major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
  # buildDate: the publication time of the module version (reproducible), from its .info.
  info=$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.info
  date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info" 2>/dev/null)
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    # The proxy's module zip carries no commit id: blank the "$Format:%H$" placeholder.
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit="
    [ -n "$date" ] && flags+=" -X $pkg.buildDate=$date"
  done
  echo "$flags"
}
k8s_build() {
  local name=$1
  k8s_prepare
  cd "$K8S_DIR/src"
  "${GO[@]}" build -ldflags "$(k8s_ldflags)" -o "$TMP_OUT" "k8s.io/kubernetes/cmd/$name"
}

# ---- helm --------------------------------------------------------------------------------------
helm_build() {
  local tmpbin gomod cg kmaj kmin flags
  gomod=$("${GO[@]}" mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  cg=$(sed -n 's#^[[:space:]]*k8s\.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod" | head -n1)
  flags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  if [ -n "$cg" ]; then   # as helm's Makefile: default Kubernetes version for capabilities/lint
    kmaj=1; kmin=$cg
    flags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$kmaj -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kmin"
    flags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$kmaj -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kmin"
  fi
  tmpbin=$(mktemp -d "$HELM_DIR/gobin.XXXXXX")
  GOBIN=$tmpbin "${GO[@]}" install -ldflags "$flags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv -f "$tmpbin/helm" "$TMP_OUT"
  rmdir "$tmpbin"
}

# ---- cert-manager ------------------------------------------------------------------------------
# A scratch module requiring the cert-manager module, so its go.mod's versions (k8s.io v0.26.x)
# are used as they are; its one replace (miekg/dns) is repeated here because a dependency's
# replace directives do not apply to the main module.
cm_prepare() {
  local src=$CM_DIR/src
  mkdir -p "$src"
  [ -f "$src/.ready" ] && return 0
  local gomod
  gomod=$("${GO[@]}" mod download -json "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [ -f "$gomod" ] || { echo "cannot find go.mod of cert-manager@$CERT_MANAGER_VERSION"; return 1; }
  {
    echo "module partnergate.local/cert-manager-build"
    echo
    echo "go 1.26.0"
    echo
    echo "require github.com/cert-manager/cert-manager $CERT_MANAGER_VERSION"
    echo
    sed -n 's#^replace[[:space:]]\{1,\}\(.*=>.*\)$#replace \1#p' "$gomod"
  } >"$src/go.mod"
  {
    echo "//go:build tools"
    echo
    echo "package tools"
    echo
    echo "import ("
    local b
    for b in "${CM_BINS[@]}"; do echo "	_ \"github.com/cert-manager/cert-manager/cmd/${CM_PKG[$b]}\""; done
    echo ")"
  } >"$src/tools.go"
  rm -f "$src/go.sum"
  (cd "$src" && "${GO[@]}" mod tidy)
  touch "$src/.ready"
}
cm_build() {
  local name=$1 pkg=github.com/cert-manager/cert-manager/pkg/util
  cm_prepare
  cd "$CM_DIR/src"
  "${GO[@]}" build -ldflags "-s -w -X $pkg.AppVersion=$CERT_MANAGER_VERSION -X $pkg.AppGitState=clean" \
    -o "$TMP_OUT" "github.com/cert-manager/cert-manager/cmd/${CM_PKG[$name]}"
}
# The CRDs of deploy/crds are Helm templates only in their metadata.labels: each file's
# templated label lines become one plain label, so kubectl can apply them as they are.
cm_crds() {
  [ -s "$CM_CRDS" ] && { echo "cached: cert-manager CRDs -> $CM_CRDS"; return 0; }
  local dir tmp f
  dir=$("${GO[@]}" mod download -json "github.com/cert-manager/cert-manager@$CERT_MANAGER_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  [ -d "$dir/deploy/crds" ] || { echo "build.sh: no deploy/crds in cert-manager@$CERT_MANAGER_VERSION" >&2; exit 1; }
  mkdir -p "$(dirname "$CM_CRDS")"
  rm -f "$CM_CRDS".tmp.*
  tmp=$(mktemp "$CM_CRDS.tmp.XXXXXX")
  for f in "$dir"/deploy/crds/crd-*.yaml; do
    echo "---"
    awk '/\{\{/ { if (!done) print "    app.kubernetes.io/name: cert-manager"; done = 1; next } { print }' "$f"
  done >"$tmp"
  if grep -q '{{' "$tmp" || [ "$(grep -c '^kind: CustomResourceDefinition' "$tmp")" -ne 6 ]; then
    echo "build.sh: unexpected cert-manager CRD files in $dir/deploy/crds" >&2
    rm -f "$tmp"
    exit 1
  fi
  chmod 0644 "$tmp"
  mv -f "$tmp" "$CM_CRDS"
  echo "prepared cert-manager CRDs -> $CM_CRDS"
}

# ---- coredns -----------------------------------------------------------------------------------
# A scratch module with its own main that links only the plugins the cluster DNS uses (the
# documented way to build CoreDNS with a chosen plugin set): the full build pulls every cloud
# provider SDK for plugins the cluster never loads. The plugin ORDER is CoreDNS's own
# (core/dnsserver's directive list), not the import order.
DNS_PLUGINS=(bind errors log health ready kubernetes cache loadbalance template)
dns_prepare() {
  local src=$DNS_DIR/src p
  mkdir -p "$src"
  [ -f "$src/.ready" ] && return 0
  printf 'module partnergate.local/coredns-build\n\ngo 1.26.0\n\nrequire github.com/coredns/coredns %s\n' \
    "$COREDNS_VERSION" >"$src/go.mod"
  {
    echo "// CoreDNS with the plugins of the test cluster's DNS only (tests/cluster/up.sh)."
    echo "package main"
    echo
    echo "import ("
    echo "	_ \"github.com/coredns/coredns/core/dnsserver\""
    echo "	\"github.com/coredns/coredns/coremain\""
    for p in "${DNS_PLUGINS[@]}"; do echo "	_ \"github.com/coredns/coredns/plugin/$p\""; done
    echo ")"
    echo
    echo "func main() { coremain.Run() }"
  } >"$src/main.go"
  rm -f "$src/go.sum"
  (cd "$src" && "${GO[@]}" mod tidy)
  touch "$src/.ready"
}
dns_build() {
  dns_prepare
  cd "$DNS_DIR/src"
  "${GO[@]}" build -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" -o "$TMP_OUT" .
}

# ---- main --------------------------------------------------------------------------------------
echo "partnergate test control plane: k8s $K8S_VERSION, etcd $ETCD_VERSION, helm $HELM_VERSION, cert-manager $CERT_MANAGER_VERSION, coredns $COREDNS_VERSION (cache: $CACHE)"
build_one etcd "$ETCD_VERSION" "${BIN_PATH[etcd]}" etcd_build
for b in "${K8S_BINS[@]}"; do
  build_one "$b" "$K8S_VERSION" "${BIN_PATH[$b]}" k8s_build "$b"
done
build_one helm "$HELM_VERSION" "${BIN_PATH[helm]}" helm_build
for b in "${CM_BINS[@]}"; do
  build_one "$b" "$CERT_MANAGER_VERSION" "${BIN_PATH[$b]}" cm_build "$b"
done
cm_crds
build_one coredns "$COREDNS_VERSION" "${BIN_PATH[coredns]}" dns_build

mkdir -p "$BIN_DIR"
for b in "${ALL_BINS[@]}"; do ln -sfn "${BIN_PATH[$b]}" "$BIN_DIR/$b"; done
ln -sfn "$CM_CRDS" "$BIN_DIR/cert-manager.crds.yaml"

echo "all binaries ready in $(fmt_secs $((SECONDS - TOTAL_START))):"
for b in "${ALL_BINS[@]}"; do printf '  %-24s %s\n' "$b" "${BIN_PATH[$b]}"; done
echo "bin dir (symlinks): $BIN_DIR"
if [ "$mode" = print ]; then echo "$BIN_DIR" >&3; fi
