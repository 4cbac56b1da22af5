# syntax=docker/dockerfile:1
#
# Image of moge-serve: moge-gateway, moge-router, moge-expert and moge-ckpt
# in /usr/local/bin, on a distroless runtime without a shell, running as a
# non-root user. Build from the repository root:
#
#   docker build -t moge-serve:0.1.0 .
#
# docs/deploy.md describes the build and its options.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep downloaded crates and compiled dependencies between
# builds; the binaries are copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin moge-gateway --bin moge-router --bin moge-expert --bin moge-ckpt \
    && mkdir -p /out \
    && cp target/release/moge-gateway target/release/moge-router \
          target/release/moge-expert target/release/moge-ckpt /out/

# glibc and libgcc, the only shared libraries the binaries link, and the
# user "nonroot" (uid and gid 65532).
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
# Ports: gRPC, HTTP/JSON (gateway only), Prometheus metrics.
EXPOSE 8001 8000 8002
ENTRYPOINT ["/usr/local/bin/moge-gateway"]
