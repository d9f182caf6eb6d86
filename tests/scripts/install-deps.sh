#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo use, once. Postfix is installed with
# "No configuration" so it never runs as the system MTA on port 25; tests start private
# instances on loopback ports instead.
set -euo pipefail

packages=(postfix swaks libnet-ssleay-perl libio-socket-ssl-perl openssl stunnel4 python3 curl ca-certificates procps iproute2 haproxy
  prometheus   # promtool and a private Prometheus for the chart's alerts/dashboard (tests/chart)
  msmtp        # gateway/tests/it/interop.rs: a plain SMTP client
  knot bind9-utils bind9-dnsutils  # gateway/tests/it/support/dns.rs: knotd serves, BIND's dnssec-signzone signs, dig/delv check (dig also: the e2e suite queries the cluster DNS)
  python3-dkim opendkim  # gateway/tests/it/sender_auth.rs: OpenDKIM (milter of the partner's Postfix) and dkimpy's dkimsign sign the partner's mail
  iptables conntrack nftables   # tests/cluster: kube-proxy (iptables mode), conntrack entries, removing emptied nft tables on cleanup
  # The libraries of exim4-daemon-light and opensmtpd (see below).
  libgnutls-dane0 libgnutls30 libidn12 libidn2-0 libpcre2-8-0 libcrypt1 libdb5.3 libnsl2
  libevent-2.1-7 libpam0g libssl3 zlib1g)
# `make bench` (--bench): perf for the profile rows, node (with its npm) for Haraka. maddy is
# built with the machine's Go by tests/bench/peers.sh (Debian's golang is older than it needs).
if [ "${1:-}" = --bench ]; then
  packages+=(linux-perf nodejs)
fi
# Exim 4 and OpenSMTPD play partner MTAs next to Postfix (gateway/tests/it/interop.rs). The
# three packages all provide and conflict with mail-transport-agent, so dpkg cannot install
# them together; their .debs are unpacked under $peers instead (never configured, no system
# service, no /etc/exim4 or /etc/smtpd.conf in use) and the tests run the binaries from there
# with private configs. Their libraries are installed above; the users the binaries look up at
# run time are created here the way the packages' postinst scripts do.
peers=/opt/partnergate-peers
peer_debs=(exim4-daemon-light:exim4/usr/sbin/exim4 opensmtpd:opensmtpd/usr/sbin/smtpd)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
missing_peers=()
for pd in "${peer_debs[@]}"; do
  [ -x "$peers/${pd#*:}" ] || missing_peers+=("${pd%%:*}")
done
users_ok=true
for u in Debian-exim opensmtpd opensmtpq; do id "$u" >/dev/null 2>&1 || users_ok=false; done
[ -d /var/lib/opensmtpd/empty ] || users_ok=false
if [ ${#missing[@]} -eq 0 ] && [ ${#missing_peers[@]} -eq 0 ] && $users_ok; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ${#missing[@]} -gt 0 ] || [ ${#missing_peers[@]} -gt 0 ]; then
  $sudo apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  # msmtp asks whether to enable its AppArmor profile; the tests do not need it.
  echo "msmtp msmtp/apparmor boolean false" | $sudo debconf-set-selections
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ${#missing_peers[@]} -gt 0 ]; then
  echo "unpacking under $peers: ${missing_peers[*]}"
  tmp=$(mktemp -d)
  chmod 755 "$tmp"  # apt-get download writes as the _apt user
  (cd "$tmp" && apt-get download "${missing_peers[@]}" >/dev/null)
  for pd in "${peer_debs[@]}"; do
    name=${pd%%:*} dir=${pd#*:}; dir=${dir%%/*}
    deb=$(ls "$tmp/${name}"_*.deb 2>/dev/null || true)
    [ -n "$deb" ] || continue
    $sudo mkdir -p "$peers/$dir"
    $sudo dpkg-deb -x "$deb" "$peers/$dir"
  done
  rm -rf "$tmp"
fi
if ! $users_ok; then
  # Exim's compiled-in exim_user/group; OpenSMTPD's privilege-separation users and its
  # root-owned chroot directory.
  getent group Debian-exim >/dev/null || $sudo addgroup --system --allow-bad-names Debian-exim >/dev/null
  id Debian-exim >/dev/null 2>&1 || $sudo adduser --system --allow-bad-names --home /nonexistent \
    --no-create-home --disabled-password --ingroup Debian-exim Debian-exim >/dev/null 2>&1
  for u in opensmtpd opensmtpq; do
    getent group "$u" >/dev/null || $sudo addgroup --system "$u" >/dev/null
    id "$u" >/dev/null 2>&1 || $sudo adduser --system --home /var/lib/opensmtpd/empty \
      --no-create-home --disabled-password --ingroup "$u" "$u" >/dev/null 2>&1
  done
  $sudo mkdir -p /var/lib/opensmtpd/empty
  $sudo chmod 755 /var/lib/opensmtpd/empty
fi
# A Postfix package may try to start the system instance; the tests never want it.
$sudo postfix stop >/dev/null 2>&1 || true
# Nor the system Prometheus: tests/chart runs its own on loopback with its own config and data.
if command -v systemctl >/dev/null 2>&1; then $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
