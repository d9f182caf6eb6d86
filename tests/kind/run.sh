#!/usr/bin/env bash
# partnergate in kind, for users with Docker, kind, helm, kubectl and openssl.
#
# NOT run by the project's CI: the build machine has no Docker engine, so this script has never
# run there. It mirrors the flow the project does test on its local control plane (tests/cluster:
# image/binaries -> helm install -> examples -> mail -> status), step by step.
#
#   tests/kind/run.sh           create cluster "partnergate", install, send a test mail
#   tests/kind/run.sh --down    delete the cluster
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLUSTER=${CLUSTER:-partnergate}
NS=partnergate
VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/charts/partnergate/Chart.yaml")
IMAGE=partnergate/partnergate:$VERSION
step() { printf '\n== %s\n' "$*"; }

if [ "${1:-}" = --down ]; then kind delete cluster --name "$CLUSTER"; exit; fi

step "1. image: make image -> target/image/partnergate.tar ($IMAGE)"
make -C "$ROOT" image
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kind load image-archive "$ROOT/target/image/partnergate.tar" --name "$CLUSTER"

step "2. an upstream mail sink and the gateway's server certificate"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$NS" run sink --image=python:3.11-slim --port=2525 --restart=Never \
  --command -- python -m smtpd -n -c DebuggingServer 0.0.0.0:2525 2>/dev/null || true
kubectl -n "$NS" expose pod sink --port=2525 2>/dev/null || true
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=mx.example.com \
  -addext "subjectAltName=DNS:mx.example.com,DNS:partnergate-gateway.$NS.svc" \
  -keyout "$tmp/tls.key" -out "$tmp/tls.crt" 2>/dev/null
kubectl -n "$NS" create secret tls partnergate-gateway-tls --cert="$tmp/tls.crt" --key="$tmp/tls.key" \
  --dry-run=client -o yaml | kubectl apply -f -

step "3. helm install (release and namespace partnergate)"
helm upgrade --install partnergate "$ROOT/charts/partnergate" -n "$NS" --wait --timeout 5m \
  --set image.pullPolicy=Never \
  --set gateway.settings.hostname=mx.example.com \
  --set 'gateway.settings.acceptedDomains={example.com}' \
  --set gateway.settings.upstream.host=sink.$NS.svc --set gateway.settings.upstream.port=2525 \
  --set gateway.settings.upstream.tls=None

step "4. example connectors"
if compgen -G "$ROOT/examples/*.yaml" >/dev/null; then
  kubectl create namespace mail --dry-run=client -o yaml | kubectl apply -f -
  kubectl apply -f "$ROOT/examples/"   # top level only; examples/invalid/ shows refusals
  kubectl wait --for=condition=Ready pc --all -A --timeout=120s || true
fi

step "5. a test mail with swaks from a pod (STARTTLS, to the sink through the gateway)"
kubectl -n "$NS" run swaks --image=debian:bookworm-slim --restart=Never --rm -i --command -- sh -c \
  "apt-get update -qq >/dev/null && apt-get install -y -qq swaks >/dev/null &&
   swaks --server partnergate-gateway.$NS.svc --port 25 --tls \
     --from someone@partner.example.net --to postmaster@example.com --h-Subject 'partnergate kind test'"
kubectl -n "$NS" logs sink | tail -n 20
helm test partnergate -n "$NS" || true

step "6. connectors"
kubectl get pc -A
