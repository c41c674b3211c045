# syntax=docker/dockerfile:1
#
# The imgate gateway image.
#
#   docker build -t imgate .                      # compile inside the build (the default target)
#   docker run --rm -p 7400:7400 -p 127.0.0.1:7401:7401 imgate
#
# Stages:
#   builder   compiles `imgate` (release) on rust:*-bookworm. Dependencies are compiled in a layer
#             of their own, keyed on the manifests and Cargo.lock only, so a change to the sources
#             rebuilds the workspace crates and not the ~300 dependencies.
#   base      the runtime: debian:bookworm-slim, CA certificates, curl for the HEALTHCHECK, a
#             non-root user `imgate` (uid 10001) and a writable working directory /var/lib/imgate
#             (without IMGATE_STORE__URL a lone node keeps its SQLite file there: mount a volume
#             on it to keep the messages).
#   prebuilt  `base` plus a binary compiled outside Docker (same glibc: Debian bookworm):
#                 cargo build --release -p imgate
#                 mkdir -p /tmp/ctx && cp target/release/imgate /tmp/ctx/
#                 docker build --target prebuilt -f Dockerfile -t imgate /tmp/ctx
#             The context of that build is the directory holding the binary, nothing else.
#             scripts/compose-test.sh uses it: compiling the ~300 crates again inside a
#             container takes far longer than reusing the host's cargo cache.
#   runtime   `base` plus the binary from `builder` (the default, last stage).
#
# Both runtime targets run `imgate serve` as uid 10001 with the client port 7400 (TCP and
# WebSocket) and the admin port 7401 (admin API, /metrics, /healthz, /readyz) on all interfaces
# of the container. Configure with IMGATE_* variables or a file (IMGATE_CONFIG=/etc/imgate/imgate.toml);
# see deploy/imgate.production.toml.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- builder ---------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src

# 1. Dependencies only. The workspace members' manifests with empty sources: a change to the
#    code does not invalidate this layer. (A new workspace member needs a line here.)
COPY Cargo.toml Cargo.lock ./
COPY shared/Cargo.toml shared/
COPY gateway/Cargo.toml gateway/
COPY loadtest/Cargo.toml loadtest/
RUN for m in shared gateway loadtest; do \
        mkdir -p "$m/src" && echo 'fn main() {}' > "$m/src/main.rs" && : > "$m/src/lib.rs"; \
    done \
 && cargo build --release --locked -p imgate \
 && rm -rf shared/src gateway/src loadtest/src

# 2. The workspace itself. The migrations (sqlx::migrate!) and docs/openapi.json (include_str!)
#    are compiled into the binary. `touch` because COPY keeps the files' old modification times,
#    which cargo would take for older than the stub build above.
COPY shared shared
COPY gateway gateway
COPY loadtest loadtest
COPY migrations migrations
COPY docs docs
RUN find shared gateway loadtest -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p imgate \
 && install -D -m 0755 target/release/imgate /out/imgate \
 && strip --strip-debug /out/imgate   # the release profile keeps line tables; symbols stay

# --- base ------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS base
# curl: for the HEALTHCHECK below and for operators poking the admin API from inside.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 imgate \
 && useradd --uid 10001 --gid imgate --no-log-init --home-dir /var/lib/imgate --create-home \
        --shell /usr/sbin/nologin imgate
WORKDIR /var/lib/imgate
# Listen on every interface of the container: publish the admin port only where it is safe
# (docker-compose.yml binds it to 127.0.0.1 on the host; in Kubernetes it is a ClusterIP Service).
ENV IMGATE_CLIENT__LISTEN=0.0.0.0:7400 \
    IMGATE_ADMIN__LISTEN=0.0.0.0:7401 \
    IMGATE_LOG__FORMAT=json
EXPOSE 7400 7401
# Liveness only (/healthz): /readyz is 503 while the node drains or Redis is down, and an
# orchestrator should not restart a node for that. Docker honours this; Podman's default OCI
# image format drops it (build with --format docker to keep it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
    CMD curl -fsS http://127.0.0.1:7401/healthz || exit 1
# SIGTERM starts the graceful shutdown (kick clients "shutdown", drain for shutdown.grace_ms,
# leave the cluster, flush the store). Give the container longer than grace_ms to stop.
STOPSIGNAL SIGTERM
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/imgate"]
CMD ["serve"]

# --- prebuilt: a binary built on a bookworm host ---------------------------------------------
FROM base AS prebuilt
COPY --chmod=0755 imgate /usr/local/bin/imgate

# --- runtime (default) -----------------------------------------------------------------------
FROM base AS runtime
COPY --from=builder /out/imgate /usr/local/bin/imgate
