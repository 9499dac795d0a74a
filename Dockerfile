# One image with both binaries: tether-server and tether-agent.
#   docker build -t tether .
#   docker run --rm tether tether-server --help
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tether-server -p tether-agent \
 && mkdir -p /out \
 && install -m 0755 target/release/tether-server target/release/tether-agent /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/tether --shell /usr/sbin/nologin tether
COPY --from=build /out/tether-server /out/tether-agent /usr/local/bin/
USER tether
# QUIC and TLS over TCP share the port.
EXPOSE 9443/udp 9443/tcp
ENTRYPOINT []
CMD ["tether-agent", "--help"]
