# syntax=docker/dockerfile:1
# pullthrough's container image: one static binary on `scratch`, running as non-root.
#
# Multi-arch (amd64 and arm64), pushed to the registry the DaemonSet pulls from:
#   docker buildx create --use
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     -t ghcr.io/pullthrough/pullthrough:0.1.0 --push .
#
# Each platform builds natively (under QEMU for the other architecture), on Alpine, whose Rust
# targets musl and links statically: no libc in the final image, and ring's C and assembly build
# with Alpine's own compiler. `scripts/static-build` builds and checks the same static binary
# without Docker.
#
# The image must never depend on pullthrough to be pulled: keep it in a registry that nodes reach
# directly (this one, or a private ECR repository that is not a pull-through prefix). See
# docs/install.md, "The DaemonSet's own image".

FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev ca-certificates
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin pullthrough \
 && strip target/release/pullthrough

FROM scratch
# rustls-native-certs reads the system trust store: ECR's and the AWS APIs' roots come from here.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /src/target/release/pullthrough /pullthrough
# The mirror runs as this user. The DaemonSet's hosts installer overrides it with root, for its
# one container only (see deploy/node/daemonset.yaml).
USER 65532:65532
ENTRYPOINT ["/pullthrough"]
