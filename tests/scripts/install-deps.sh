#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo use, once. Postfix is installed with
# "No configuration" so it never runs as the system MTA on port 25; tests start private
# instances on loopback ports instead.
set -euo pipefail

packages=(postfix swaks libnet-ssleay-perl libio-socket-ssl-perl openssl stunnel4 python3 curl ca-certificates procps iproute2 haproxy
  prometheus)   # promtool and a private Prometheus for the chart's alerts/dashboard (tests/chart)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing Debian packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# A Postfix package may try to start the system instance; the tests never want it.
$sudo postfix stop >/dev/null 2>&1 || true
# Nor the system Prometheus: tests/chart runs its own on loopback with its own config and data.
if command -v systemctl >/dev/null 2>&1; then $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
