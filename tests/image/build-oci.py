#!/usr/bin/env python3
"""Assemble the partnergate container image as an OCI image archive, without Docker or a registry.

    build-oci.py --gateway BIN --operator BIN --out target/image/partnergate.tar [--tag T]

Writes the OCI image layout (oci-layout, index.json, blobs/sha256/...) straight into a tar:
one gzip layer holding the two static binaries (stripped) under /usr/local/bin plus a minimal /etc
(passwd/group with the non-root user 65532, nsswitch.conf), a config with Entrypoint
partnergate-gateway and User 65532, and a manifest. A Docker-style manifest.json with RepoTags is
added beside it, so `docker load` and `kind load image-archive` (containerd) name the image
"<repository>:<tag>". Output is reproducible: fixed mtimes (SOURCE_DATE_EPOCH, default 0),
sorted entries, gzip without timestamp.

Same layout as the Dockerfile's runtime stage. Python 3.11 standard library only.
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

UID = GID = 65532
BIN_DIR = "usr/local/bin"
ENTRYPOINT = f"/{BIN_DIR}/partnergate-gateway"

# Files of the runtime filesystem besides the binaries: (path, mode, uid, content or None = dir).
BASE_FILES = [
    ("etc", 0o755, 0, None),
    ("etc/passwd", 0o644, 0,
     b"root:x:0:0:root:/root:/sbin/nologin\n"
     b"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"),
    ("etc/group", 0o644, 0, b"root:x:0:\nnonroot:x:65532:\n"),
    # Static glibc (>= 2.34) has the files and dns NSS modules built in.
    ("etc/nsswitch.conf", 0o644, 0, b"hosts: files dns\n"),
    ("home", 0o755, 0, None),
    ("home/nonroot", 0o700, UID, None),
    ("tmp", 0o1777, 0, None),
    ("usr", 0o755, 0, None),
    ("usr/local", 0o755, 0, None),
    (BIN_DIR, 0o755, 0, None),
]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(binaries: dict[str, bytes], mtime: int) -> bytes:
    """Uncompressed layer tar, entries sorted, owner/mtime fixed."""
    entries = [(p, m, u, c) for p, m, u, c in BASE_FILES]
    entries += [(f"{BIN_DIR}/{name}", 0o755, 0, data) for name, data in binaries.items()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, mode, uid, content in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(path)
            info.mode, info.uid, info.gid, info.mtime = mode, uid, uid, mtime
            info.uname = info.gname = "nonroot" if uid == UID else "root"
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, mtime
    tar.addfile(info, io.BytesIO(data))


def read_binary(path: Path, strip: bool) -> bytes:
    """The binary's bytes, with debug info and symbols stripped (binutils `strip`) if asked."""
    if not strip:
        return path.read_bytes()
    if not shutil.which("strip"):
        sys.exit("build-oci.py: `strip` not found (binutils); use --no-strip")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        subprocess.run(["strip", "-o", str(out), str(path)], check=True)
        return out.read_bytes()


def workspace_version(root: Path) -> str:
    with open(root / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["workspace"]["package"]["version"]


def main() -> int:
    root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gateway", required=True, type=Path)
    ap.add_argument("--operator", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--repository", default="partnergate/partnergate")
    ap.add_argument("--tag", default=None, help="default: the Cargo workspace version")
    ap.add_argument("--arch", default="amd64")
    ap.add_argument("--no-strip", dest="strip", action="store_false",
                    help="keep debug info (the release profile has line tables)")
    args = ap.parse_args()

    tag = args.tag or workspace_version(root)
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    created = datetime.datetime.fromtimestamp(mtime, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    binaries = {
        "partnergate-gateway": read_binary(args.gateway, args.strip),
        "partnergate-operator": read_binary(args.operator, args.strip),
    }
    layer = layer_tar(binaries, mtime)
    layer_gz = gzip.compress(layer, compresslevel=9, mtime=0)

    labels = {
        "org.opencontainers.image.title": "partnergate",
        "org.opencontainers.image.description":
            "partnergate gateway and operator (entrypoint: partnergate-gateway)",
        "org.opencontainers.image.version": tag,
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    config = {
        "created": created,
        "architecture": args.arch,
        "os": "linux",
        "config": {
            "User": f"{UID}:{GID}",
            "Entrypoint": [ENTRYPOINT],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "WorkingDir": "/",
            "ExposedPorts": {"2525/tcp": {}, "8080/tcp": {}},
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]},
        "history": [{"created": created, "created_by": "tests/image/build-oci.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": sha256(layer_gz),
            "size": len(layer_gz),
        }],
        "annotations": labels,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256(manifest_bytes),
            "size": len(manifest_bytes),
            "platform": {"architecture": args.arch, "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    blob = lambda digest: "blobs/sha256/" + digest.split(":", 1)[1]  # noqa: E731
    docker_manifest = [{
        "Config": blob(manifest["config"]["digest"]),
        "RepoTags": [f"{args.repository}:{tag}"],
        "Layers": [blob(manifest["layers"][0]["digest"])],
    }]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(info)
        for data in (config_bytes, layer_gz, manifest_bytes):
            add_file(tar, blob(sha256(data)), data, mtime)
        add_file(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), mtime)
        add_file(tar, "index.json", json.dumps(index, indent=2).encode() + b"\n", mtime)
        add_file(tar, "manifest.json", json.dumps(docker_manifest).encode() + b"\n", mtime)
    tmp.replace(args.out)
    print(f"{args.out}: {args.repository}:{tag} manifest {sha256(manifest_bytes)} "
          f"layer {len(layer_gz)} bytes compressed, {len(layer)} uncompressed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
