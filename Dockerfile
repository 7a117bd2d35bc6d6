# Builds the binary and ships it with the tools its portal modes run: iptables (both the nft and
# legacy flavours; iptablesCommand picks one), conntrack (UDP flush on endpoint changes) and
# iproute2 (bind portal mode).
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin userspace-proxy

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables conntrack iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/userspace-proxy /usr/local/bin/userspace-proxy
ENTRYPOINT ["/usr/local/bin/userspace-proxy"]
