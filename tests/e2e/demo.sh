#!/usr/bin/env bash
# `make demo`: the whole system on a local control plane, left running for you to explore.
# Builds what is missing (Go-built control plane and cert-manager cached in ~/.cache/partnergate,
# cargo builds), starts cert-manager (which issues every certificate), installs the chart,
# applies an inbound and an outbound connector, sends four mails (one through the Service), runs `helm test` and shows what happened.
# `make cluster-down` stops everything.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=env.sh
. "$HERE/env.sh"
# shellcheck source=postfix.sh
. "$HERE/postfix.sh"
PKI=$E2E_WORK/pki

e2e_up
e2e_log "applying PartnerConnectors: contoso (inbound: TLS + certificate mail.contoso.test + 127.0.0.20), fabrikam (outbound: DomainValidation)"
kubectl apply -f "$HERE/manifests/contoso.yaml" -f "$HERE/manifests/fabrikam.yaml"
kubectl -n mail wait --for=condition=Ready partnerconnector/contoso partnerconnector/fabrikam --timeout=180s
mapfile -t GW < <(e2e_gateway_ips)
gw=${GW[0]}
svc=$(kubectl -n "$NS" get svc partnergate-gateway -o jsonpath='{.spec.clusterIP}')

show() { printf '  %-70s -> \033[1m%s\033[0m\n' "$1" "$2"; }
echo
e2e_log "four mails from contoso.test to bob@org.test (1-3 to gateway pod $gw:2525, 4 to the Service)"
show "1. STARTTLS + client certificate mail.contoso.test, from 127.0.0.20" \
  "$(e2e_swaks "$gw" 127.0.0.20 alice@contoso.test bob@org.test --tls \
      --tls-cert "$PKI/contoso-mail.crt" --tls-key "$PKI/contoso-mail.key" --header 'Subject: demo 1')"
show "2. plaintext, from 127.0.0.20" \
  "$(e2e_swaks "$gw" 127.0.0.20 alice@contoso.test bob@org.test --header 'Subject: demo 2')"
show "3. STARTTLS + certificate for mail.evil.test, from 127.0.0.20" \
  "$(e2e_swaks "$gw" 127.0.0.20 alice@contoso.test bob@org.test --tls \
      --tls-cert "$PKI/contoso-wrong.crt" --tls-key "$PKI/contoso-wrong.key" --header 'Subject: demo 3')"
show "4. the same as 1, to the Service $svc:25 (kube-proxy picks a gateway pod)" \
  "$(e2e_swaks "$svc:25" 127.0.0.20 alice@contoso.test bob@org.test --tls \
      --tls-cert "$PKI/contoso-mail.crt" --tls-key "$PKI/contoso-mail.key" --header 'Subject: demo 4')"
echo
e2e_log "kubectl -n $NS get svc,endpointslices (pod IPs in $(e2e_cluster_env POD_CIDR), routed by kube-proxy)"
kubectl -n "$NS" get svc,endpointslices
echo
e2e_log "helm test partnergate -n $NS (a pod resolves partnergate-gateway.$NS.svc.cluster.local via CoreDNS, STARTTLS through the Service)"
helm test partnergate -n "$NS" --timeout 120s
echo
e2e_log "kubectl get partnerconnectors -A"
kubectl get partnerconnectors -A
echo
e2e_log "kubectl get certificates -A (issued by cert-manager, running next to the control plane)"
kubectl get certificates -A
echo
e2e_log "what the organisation's mail server (smtp-sink on 127.0.0.1:$E2E_SINK_PORT) received"
for f in $(find "$E2E_WORK/sink" -name 'mail.*' -type f | sort); do
  echo "--- $f"
  grep -E '^(X-Mail-From|X-Rcpt-To|Received|X-Partnergate-Connector|Subject):' "$f" | sed 's/^/  /'
done
echo
gw_pod=$(kubectl -n "$NS" get pods -l app.kubernetes.io/component=gateway --field-selector "status.podIP=$gw" -o jsonpath='{.items[0].metadata.name}')
e2e_log "kubectl -n $NS logs $gw_pod | tail -n 5 (served by the process kubelet's API)"
kubectl -n "$NS" logs "$gw_pod" | tail -n 5
cat <<MSG

The system is still running. To explore:
  export KUBECONFIG=$KUBECONFIG
  export PATH=$(dirname "$(command -v kubectl)"):\$PATH     # kubectl and helm built for this cluster
  kubectl get partnerconnectors -A; kubectl -n mail describe partnerconnector contoso
  kubectl -n $NS get pods -o wide                       # gateway pods on $(e2e_cluster_env POD_CIDR)
  dig @$(e2e_cluster_env DNS_SERVICE_IP) partnergate-gateway.$NS.svc.cluster.local   # cluster DNS (CoreDNS)
  swaks --server $svc:25 ...                            # the Service (kube-proxy, iptables mode)
  cmctl renew -n $NS partnergate-gateway                # cert-manager reissues the gateway certificate
  curl -s http://$gw:8080/status                        # what a gateway has loaded
  swaks --server $gw:2525 --local-interface 127.0.0.20 --from a@contoso.test --to b@org.test --tls \\
        --tls-cert $PKI/contoso-mail.crt --tls-key $PKI/contoso-mail.key
  kubectl -n $NS logs -f $gw_pod   # follow a gateway's JSON log lines (kubectl logs works here)
  logs: $PARTNERGATE_CLUSTER_STATE/kubelet/pods/*/*.log (CRI format), $E2E_WORK/kubelet.log,
        $PARTNERGATE_CLUSTER_STATE/logs/cert-manager-controller.log
Stop everything with: make cluster-down
MSG
