#!/usr/bin/env bash
# Stops everything `make demo` / the e2e suite started: chart, process kubelet, sink, private
# Postfix instances, the suite's Prometheus (tests/e2e/prometheus.sh), cert-manager and the
# control plane (tests/cluster/down.sh stops the last two).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=env.sh
. "$HERE/env.sh"
# shellcheck source=postfix.sh
. "$HERE/postfix.sh"
bin=$("$REPO/tests/cluster/build.sh" --print-bin-dir 2>/dev/null) && export PATH="$bin:$PATH"
e2e_postfix_down contoso
e2e_postfix_down fabrikam
"$HERE/prometheus.sh" stop
e2e_down
echo "stopped"
