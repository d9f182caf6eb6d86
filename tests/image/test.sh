#!/usr/bin/env bash
# Test the OCI image archive built by `make image`.
#
#   tests/image/test.sh [ARCHIVE]    default target/image/partnergate.tar
#   tests/image/test.sh --selftest   build an archive from two tiny static stand-in binaries and
#                                    run the same checks (fast; tests build-oci.py itself)
#
# 1. validate-oci.py: index -> manifest -> config/layer digests and sizes, media types,
#    diff_ids, User 65532, Entrypoint, both binaries present, executable and static; unpack.
# 2. Run the entrypoint from the unpacked rootfs, chrooted and as uid 65532 when we are root (so
#    nothing of the host's filesystem is used), else directly: `--help` of both binaries, and
#    `partnergate-gateway check` on a fleet + connectors file with a fresh self-signed cert.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/image
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

selftest=false
case "${1:-}" in
  --selftest) selftest=true ;;
  -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
esac

if $selftest; then
  # Stand-ins that behave like the real CLIs for what this script calls.
  cat >"$WORK/standin.rs" <<'EOF'
fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    match a.first().map(String::as_str) {
        Some("--help") => println!("Usage: standin [--help] <COMMAND>\n  check"),
        Some("check") => {
            for w in a.windows(2) {
                if w[0] == "--fleet" || w[0] == "--connectors" {
                    std::fs::read(&w[1]).expect("read");
                }
            }
            println!("ok");
        }
        _ => std::process::exit(2),
    }
}
EOF
  rustc -O -C target-feature=+crt-static --target x86_64-unknown-linux-gnu \
    -o "$WORK/standin" "$WORK/standin.rs"
  ARCHIVE=$WORK/selftest.tar
  python3 "$HERE/build-oci.py" --gateway "$WORK/standin" --operator "$WORK/standin" \
    --out "$ARCHIVE" --tag selftest >/dev/null
  # Reproducible: the same inputs give the same bytes.
  python3 "$HERE/build-oci.py" --gateway "$WORK/standin" --operator "$WORK/standin" \
    --out "$WORK/again.tar" --tag selftest >/dev/null
  cmp -s "$ARCHIVE" "$WORK/again.tar" || { echo "FAIL: build-oci.py output is not reproducible"; exit 1; }
else
  ARCHIVE=${1:-$ROOT/target/image/partnergate.tar}
  [ -f "$ARCHIVE" ] || { echo "FAIL: $ARCHIVE missing: run 'make image'"; exit 1; }
fi

ROOTFS=$WORK/rootfs
out=$(python3 "$HERE/validate-oci.py" "$ARCHIVE" "$ROOTFS")
echo "${out%$'\n'*}"
entry=$(printf '%s\n' "$out" | tail -n1 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0])')

# Independent readers, when installed (Debian: apt-get install umoci skopeo).
if command -v skopeo >/dev/null; then
  skopeo inspect --config oci-archive:"$ARCHIVE" | python3 -c '
import json, sys
c = json.load(sys.stdin)["config"]
assert c["User"].split(":")[0] == "65532" and c["Entrypoint"], c'
  echo "skopeo: reads the archive (config User and Entrypoint as expected)"
fi
if command -v umoci >/dev/null; then
  mkdir "$WORK/layout"
  tar -xf "$ARCHIVE" -C "$WORK/layout"
  tag=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$WORK/layout/index.json")
  umoci unpack --image "$WORK/layout:$tag" "$WORK/bundle" >/dev/null
  cmp -s "$WORK/bundle/rootfs$entry" "$ROOTFS$entry" || { echo "FAIL: umoci unpacked a different $entry"; exit 1; }
  echo "umoci: unpacks the layout to the same rootfs"
fi

# run CMD... inside the image's rootfs.
if [ "$(id -u)" = 0 ] && command -v chroot >/dev/null; then
  run() { chroot --userspec=65532:65532 "$ROOTFS" "$@"; }
  mode="chroot as 65532"
else
  run() { local bin=$1; shift; "$ROOTFS$bin" "$@"; }
  mode="directly (not root: no chroot)"
fi

echo "running the entrypoint $entry $mode"
run "$entry" --help >"$WORK/help.txt"
grep -q . "$WORK/help.txt" || { echo "FAIL: $entry --help printed nothing"; exit 1; }
run /usr/local/bin/partnergate-operator --help >/dev/null

if grep -qw check "$WORK/help.txt"; then
  # A config the gateway must accept: placed inside the rootfs so the chroot sees it.
  T=$ROOTFS/tmp/t
  mkdir -p "$T"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=mx.example.com -addext subjectAltName=DNS:mx.example.com \
    -keyout "$T/tls.key" -out "$T/tls.crt" 2>/dev/null
  cat >"$T/fleet.json" <<'EOF'
{"hostname": "mx.example.com",
 "serverCertificate": {"certFile": "/tmp/t/tls.crt", "keyFile": "/tmp/t/tls.key"},
 "acceptedDomains": ["example.com"],
 "upstream": {"host": "mail.example.com", "port": 25, "tls": "Opportunistic"}}
EOF
  echo '{"inbound": [], "outbound": []}' >"$T/connectors.json"
  chmod -R a+rX "$T"
  run "$entry" check --fleet /tmp/t/fleet.json --connectors /tmp/t/connectors.json
  echo "check: accepted"
  if ! $selftest && run "$entry" --help | grep -qw probe; then
    # Serve from the image and probe it (EHLO + STARTTLS) with the image's own probe.
    read -r smtp admin < <(python3 -c 'import socket
s = [socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
    python3 - "$T/fleet.json" "$smtp" "$admin" <<'EOF'
import json, sys
f = json.load(open(sys.argv[1]))
f.update(listen=f"127.0.0.1:{sys.argv[2]}", adminListen=f"127.0.0.1:{sys.argv[3]}")
json.dump(f, open(sys.argv[1], "w"))
EOF
    run "$entry" --fleet /tmp/t/fleet.json --connectors /tmp/t/connectors.json >"$WORK/gateway.log" 2>&1 &
    gpid=$!
    for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
    if run "$entry" probe --host 127.0.0.1 --port "$smtp" --starttls; then ok=true; else ok=false; fi
    kill "$gpid" 2>/dev/null || true; wait "$gpid" 2>/dev/null || true
    $ok || { tail -n 20 "$WORK/gateway.log"; echo "FAIL: probe against the gateway run from the image"; exit 1; }
    echo "gateway from the image serves EHLO + STARTTLS (probe passed)"
  fi
else
  echo "SKIP: $entry has no 'check' subcommand yet"
fi
echo "PASS: image test ($ARCHIVE)"
