# syntax=docker/dockerfile:1
# Baton's container image, multi-stage: the build in the Rust image, the binary alone in a slim
# Debian runtime (it links only glibc; UCX is vendored and static).
#   docker build -t baton .                   # CPU (and mock devices); the default target
#   docker build -t baton:cuda --target cuda .  # with CUDA's runtime and NVRTC, for --device cuda
#   docker run --rm -p 8080:8080 baton serve --listen 0.0.0.0:8080   # the demo model
# deploy/kubernetes/ runs it as a StatefulSet (`baton node`).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p baton \
    && install -m 0755 target/release/baton /usr/local/bin/baton

# --device cuda needs the driver (from the NVIDIA container toolkit) and NVRTC 13 (in CUDA's
# runtime image), found through LD_LIBRARY_PATH.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04 AS cuda
COPY --from=build /usr/local/bin/baton /usr/local/bin/baton
RUN useradd --uid 10001 --create-home --home-dir /var/lib/baton baton
USER 10001:10001
ENV BATON_HOME=/var/lib/baton
EXPOSE 8080/tcp 8081/udp 7100/udp
ENTRYPOINT ["baton"]
CMD ["serve", "--listen", "0.0.0.0:8080"]

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --home-dir /var/lib/baton baton
COPY --from=build /usr/local/bin/baton /usr/local/bin/baton
USER 10001:10001
ENV BATON_HOME=/var/lib/baton
EXPOSE 8080/tcp 8081/udp 7100/udp
ENTRYPOINT ["baton"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
