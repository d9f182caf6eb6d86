"""Helpers for tests/bench/operator.sh.

  gen-objects.py secrets N DIR        N Secrets (~1 KiB) in namespace bench-secrets, lists of 500
  gen-objects.py connectors N DIR     N Inbound PartnerConnectors in namespace partners
  gen-objects.py pod                  the Pod object standing for the gateway (stdout)
  gen-objects.py programmed           reads a PartnerConnectorList on stdin, prints how many
                                      have Programmed=True
  gen-objects.py sync KUBECTL DIR     copies the operator's ConfigMap/Secret into DIR/connectors
                                      and DIR/material every 0.25 s (stands in for the kubelet)
"""

import base64
import json
import os
import subprocess
import sys
import time


def write_lists(items, d):
    os.makedirs(d, exist_ok=True)
    for b in range(0, len(items), 500):
        with open(f"{d}/{b:05d}.json", "w") as f:
            json.dump({"apiVersion": "v1", "kind": "List", "items": items[b:b + 500]}, f)


def secrets(n, d):
    blob = base64.b64encode(os.urandom(768)).decode()
    write_lists([{"apiVersion": "v1", "kind": "Secret",
                  "metadata": {"name": f"unrelated-{i:05d}", "namespace": "bench-secrets"},
                  "type": "Opaque", "data": {"blob": blob}} for i in range(n)], d)


def connectors(n, d):
    write_lists([{"apiVersion": "partnergate.io/v1alpha1", "kind": "PartnerConnector",
                  "metadata": {"name": f"p{i:04d}", "namespace": "partners"},
                  "spec": {"direction": "Inbound", "domains": [f"p{i:04d}.test"],
                           "inbound": {"identifyBy": "SenderDomain", "requireTls": True}}}
                 for i in range(n)], d)


def pod():
    print(json.dumps({"apiVersion": "v1", "kind": "Pod",
                      "metadata": {"name": "gateway-bench", "namespace": "partnergate",
                                   "labels": {"app.kubernetes.io/component": "gateway",
                                              "app.kubernetes.io/name": "partnergate"}},
                      "spec": {"containers": [{"name": "gateway",
                                               "image": "partnergate-gateway"}]}}))


def programmed():
    items = json.load(sys.stdin).get("items", [])
    print(sum(1 for i in items
              for c in (i.get("status") or {}).get("conditions") or []
              if c.get("type") == "Programmed" and c.get("status") == "True"))


def sync(kubectl, d):
    def get(kind, name):
        r = subprocess.run([kubectl, "get", kind, name, "-n", "partnergate", "-o", "json"],
                           capture_output=True, text=True)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def put(path, data):
        try:
            with open(path, "rb") as f:
                if f.read() == data:
                    return
        except OSError:
            pass
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.rename(path + ".tmp", path)

    while True:
        s = get("secret", "partnergate-connector-material")
        for k, v in ((s or {}).get("data") or {}).items():
            put(f"{d}/material/{k}", base64.b64decode(v))
        c = get("configmap", "partnergate-connectors")
        if c and "connectors.json" in (c.get("data") or {}):
            put(f"{d}/connectors/connectors.json", c["data"]["connectors.json"].encode())
        time.sleep(0.25)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "secrets":
        secrets(int(args[0]), args[1])
    elif cmd == "connectors":
        connectors(int(args[0]), args[1])
    elif cmd == "pod":
        pod()
    elif cmd == "programmed":
        programmed()
    elif cmd == "sync":
        sync(args[0], args[1])
    else:
        sys.exit(f"unknown command {cmd}")
