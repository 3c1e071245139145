# syntax=docker/dockerfile:1
# The `weft` image: `weft` (controller, init-iptables, CLI) and `weft-webhook`, static musl
# binaries on Debian slim with iptables (legacy and nft back ends) for the init container.
#
#   docker build -f docker/weft.Dockerfile -t ghcr.io/weft-mesh/weft:dev .     (or `make images`)
#
# Base images are pinned by exact version; pin them by digest too where your registry policy
# asks for it: --build-arg RUST_IMAGE=rust:1.95.0-alpine3.22@sha256:...
ARG RUST_IMAGE=rust:1.95.0-alpine3.22
ARG RUNTIME_IMAGE=debian:13.1-slim

FROM ${RUST_IMAGE} AS build
RUN apk add --no-cache musl-dev gcc
WORKDIR /src
COPY . .
# Fully static: the same binaries run on Debian here and in the distroless Envoy image.
ENV RUSTFLAGS="-C target-feature=+crt-static" CARGO_TERM_COLOR=never
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weft --bin weft -p weft-webhook --bin weft-webhook \
 && mkdir -p /out \
 && cp target/release/weft target/release/weft-webhook /out/ \
 && /out/weft --version && /out/weft-webhook --version

FROM ${RUNTIME_IMAGE}
# iptables provides iptables-legacy and iptables-nft (and the ip6tables ones) for
# `weft init-iptables`, the only part that runs as root (NET_ADMIN, NET_RAW, in the init container).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/weft /out/weft-webhook /usr/local/bin/
# Non-root by default: the controller and the webhook run as 65532 (the chart sets it too).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weft"]
