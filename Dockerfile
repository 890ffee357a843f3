# The orderflow image: every binary of the workspace in /usr/local/bin
# (order-api, generate-info, payment-wait, saga-coordinator, payment-provider,
# order-completed, order-cancelled, orderflow); docker-compose.yml runs one
# per service with its own `command`.
#
# Two ways to fill it:
#
#   docker build -t orderflow:latest .
#       target `runtime` (the default): builds the workspace in the Rust image,
#       copies the stripped binaries onto debian:bookworm-slim.
#
#   cargo build --release --workspace --bins   (then stage them, see below)
#   docker build --target runtime-prebuilt --build-arg BASE_IMAGE=... -t orderflow:latest .
#       target `runtime-prebuilt`: takes binaries built on the host, for
#       machines that cannot pull the Rust image. scripts/compose-smoke stages
#       them in target/docker/bin (the only part of target/ in the build
#       context, see .dockerignore). The host must build for the same glibc
#       as BASE_IMAGE or an older one (Debian bookworm here).
#
# Stage order matters for Docker's classic builder, which runs every stage
# before the target: runtime-prebuilt comes before the Rust stage and does
# not fail when nothing is staged.

ARG BASE_IMAGE=debian:bookworm-slim
ARG RUST_IMAGE=rust:1.95-bookworm

FROM ${BASE_IMAGE} AS runtime-base
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin orderflow
# The merchants, catalogue and providers the binaries were built with, as
# files: `orderflow topology export` reads providers.toml from here, and an
# operator can mount other ones over them.
COPY config /etc/orderflow/config
# A container's loopback is its own: the API listens on every interface of it.
ENV ORDERFLOW_HTTP_ADDR=0.0.0.0:8080 \
    ORDERFLOW_CONFIG_DIR=/etc/orderflow/config \
    ORDERFLOW_LOG=info \
    ORDERFLOW_LOG_FORMAT=text
EXPOSE 8080

FROM runtime-base AS runtime-prebuilt
# Cargo.lock is always in the context, so this COPY is valid when
# target/docker/bin is empty or missing (the classic builder also runs this
# stage when building `runtime`); it is removed right after.
COPY Cargo.lock target/docker/bin/* /usr/local/bin/
RUN rm /usr/local/bin/Cargo.lock
USER orderflow
CMD ["orderflow", "--help"]

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# Checked queries build from the committed .sqlx/ without a database.
ENV SQLX_OFFLINE=true
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && find target/release -maxdepth 1 -type f -perm -u+x -exec cp -t /out {} + \
 && strip --strip-debug /out/*

FROM runtime-base AS runtime
COPY --from=builder /out/ /usr/local/bin/
USER orderflow
CMD ["orderflow", "--help"]
