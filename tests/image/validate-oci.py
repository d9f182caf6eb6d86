#!/usr/bin/env python3
"""Validate an OCI image archive and unpack its root filesystem.

    validate-oci.py ARCHIVE ROOTFS_DIR

Checks, from the archive alone: oci-layout version; index.json -> manifest -> config and
layers, each blob's sha256 digest and size matching its descriptor and the media types; the
config's rootfs.diff_ids matching the uncompressed layers; layers are gzip'd tars with safe
paths; Entrypoint and User (non-root 65532); both binaries present, executable and statically
linked (no ELF PT_INTERP). Then unpacks the layers in order into ROOTFS_DIR (no whiteouts are
expected in a single-layer image) and prints the entrypoint as JSON on the last line.
"""

import gzip
import hashlib
import io
import json
import struct
import sys
import tarfile
from pathlib import Path, PurePosixPath

INDEX_MT = "application/vnd.oci.image.index.v1+json"
MANIFEST_MT = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MT = "application/vnd.oci.image.config.v1+json"
LAYER_MT = "application/vnd.oci.image.layer.v1.tar+gzip"
BINARIES = ["usr/local/bin/partnergate-gateway", "usr/local/bin/partnergate-operator"]


class Invalid(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Invalid(msg)


def elf_interp(data: bytes):
    """The ELF program interpreter (dynamic loader), or None for a static binary."""
    check(data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit LE ELF file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        p_type, = struct.unpack_from("<I", data, off)
        if p_type == 3:  # PT_INTERP
            p_offset, = struct.unpack_from("<Q", data, off + 8)
            p_filesz, = struct.unpack_from("<Q", data, off + 32)
            return data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    return None


def main() -> int:
    archive, rootfs = Path(sys.argv[1]), Path(sys.argv[2])
    with tarfile.open(archive) as tar:
        files = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}

        def read(name):
            check(name in files, f"{name}: missing from the archive")
            return tar.extractfile(files[name]).read()

        def blob(desc, media_type):
            check(desc.get("mediaType") == media_type,
                  f"{desc.get('digest')}: mediaType {desc.get('mediaType')!r}, want {media_type!r}")
            algo, _, hexd = desc["digest"].partition(":")
            check(algo == "sha256" and len(hexd) == 64, f"bad digest {desc['digest']!r}")
            data = read(f"blobs/sha256/{hexd}")
            check(len(data) == desc["size"], f"{desc['digest']}: size {len(data)} != descriptor {desc['size']}")
            check(hashlib.sha256(data).hexdigest() == hexd, f"{desc['digest']}: content does not match digest")
            return data

        layout = json.loads(read("oci-layout"))
        check(layout.get("imageLayoutVersion") == "1.0.0", f"oci-layout: {layout}")
        index = json.loads(read("index.json"))
        check(index.get("schemaVersion") == 2, "index.json: schemaVersion != 2")
        check(index.get("mediaType", INDEX_MT) == INDEX_MT, "index.json: mediaType")
        check(len(index.get("manifests", [])) == 1, "index.json: expected one manifest")
        mdesc = index["manifests"][0]
        manifest = json.loads(blob(mdesc, MANIFEST_MT))
        check(manifest.get("schemaVersion") == 2, "manifest: schemaVersion != 2")
        config = json.loads(blob(manifest["config"], CONFIG_MT))
        check(config.get("os") == "linux", "config: os != linux")
        check(config.get("architecture") == mdesc.get("platform", {}).get("architecture"),
              "config architecture differs from the index's platform")
        cfg = config.get("config", {})
        user = str(cfg.get("User", ""))
        check(user.split(":")[0] == "65532", f"config: User {user!r}, want 65532 (non-root)")
        entrypoint = cfg.get("Entrypoint") or []
        check(entrypoint == ["/usr/local/bin/partnergate-gateway"], f"config: Entrypoint {entrypoint}")

        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        check(len(diff_ids) == len(manifest["layers"]) >= 1, "config rootfs.diff_ids vs manifest layers")
        rootfs.mkdir(parents=True, exist_ok=True)
        seen = {}
        for ldesc, diff_id in zip(manifest["layers"], diff_ids):
            gz = blob(ldesc, LAYER_MT)
            raw = gzip.decompress(gz)
            check("sha256:" + hashlib.sha256(raw).hexdigest() == diff_id,
                  f"layer {ldesc['digest']}: uncompressed sha256 != diff_id {diff_id}")
            with tarfile.open(fileobj=io.BytesIO(raw)) as layer:
                for m in layer.getmembers():
                    p = PurePosixPath(m.name)
                    check(not p.is_absolute() and ".." not in p.parts, f"unsafe path {m.name!r}")
                    check(not p.name.startswith(".wh."), f"unexpected whiteout {m.name!r}")
                    check(m.isdir() or m.isfile(), f"unexpected entry type {m.name!r}")
                    seen[m.name.lstrip("./")] = (m, layer.extractfile(m).read() if m.isfile() else None)
                layer.extractall(rootfs, filter="fully_trusted")  # safe paths checked above
        for path in BINARIES:
            check(path in seen, f"{path}: not in the image")
            m, data = seen[path]
            check(m.mode & 0o111 == 0o111, f"{path}: not executable (mode {oct(m.mode)})")
            interp = elf_interp(data)
            check(interp is None, f"{path}: dynamically linked (interpreter {interp})")
        passwd = seen.get("etc/passwd", (None, b""))[1].decode()
        check(any(line.split(":")[2] == "65532" for line in passwd.splitlines() if line),
              "etc/passwd has no uid 65532")

    total = sum(d["size"] for d in manifest["layers"])
    print(f"OCI image OK: manifest {mdesc['digest']}, {len(diff_ids)} layer(s), "
          f"{total} bytes compressed, User {user}, Entrypoint {entrypoint}")
    print(json.dumps(entrypoint))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Invalid as e:
        print(f"INVALID OCI image: {e}", file=sys.stderr)
        sys.exit(1)
