# syntax=docker/dockerfile:1
# The `weft-proxy` image: Envoy 1.40 (the official distroless image) plus a static `weft`
# for the sidecar's hooks (`weft drain-proxy` on preStop, `weft wait-proxy-ready` for the
# legacy sidecar, `weft bootstrap`). Runs as the proxy UID 1337.
#
#   docker build -f docker/weft-proxy.Dockerfile -t ghcr.io/weft-mesh/weft-proxy:dev .   (or `make images`)
#
# The build stage is weft.Dockerfile's, line for line, so a builder with a layer cache
# compiles once for both images.
ARG RUST_IMAGE=rust:1.95.0-alpine3.22
ARG ENVOY_IMAGE=envoyproxy/envoy:distroless-v1.40.0

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

FROM ${ENVOY_IMAGE}
COPY --from=build /out/weft /usr/local/bin/weft
# The injected container passes Envoy's arguments only (-c /etc/weft/bootstrap/envoy.yaml ...).
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/envoy"]
