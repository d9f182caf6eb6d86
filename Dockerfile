# partnergate image: both binaries (partnergate-gateway, the entrypoint, and partnergate-operator),
# statically linked against glibc, on an empty base with only a non-root user (65532).
# The same filesystem as `make image`, which builds an OCI archive without Docker
# (tests/image/build-oci.py). Build:  docker build -t partnergate/partnergate:0.1.0 .
#
# Static glibc 2.34+ resolves names itself (files + dns NSS built in), so no libc is needed at
# runtime; TLS roots are compiled in (webpki-roots).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
WORKDIR /src
COPY . .
RUN set -eux; \
    case "${TARGETARCH:-amd64}" in \
      amd64) target=x86_64-unknown-linux-gnu ;; \
      arm64) target=aarch64-unknown-linux-gnu ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac; \
    CARGO_PROFILE_RELEASE_STRIP=true RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked --target "$target" \
      -p partnergate-gateway -p partnergate-operator; \
    mkdir -p /out/usr/local/bin /out/etc /out/home/nonroot /out/tmp; \
    cp "target/$target/release/partnergate-gateway" "target/$target/release/partnergate-operator" \
      /out/usr/local/bin/; \
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
      >/out/etc/passwd; \
    printf 'root:x:0:\nnonroot:x:65532:\n' >/out/etc/group; \
    printf 'hosts: files dns\n' >/out/etc/nsswitch.conf; \
    chown 65532:65532 /out/home/nonroot; chmod 0700 /out/home/nonroot; chmod 1777 /out/tmp

FROM scratch
COPY --from=build /out/ /
USER 65532:65532
EXPOSE 2525 8080
ENTRYPOINT ["/usr/local/bin/partnergate-gateway"]
