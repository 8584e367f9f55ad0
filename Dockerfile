# Build the server in a full toolchain image, run it in a slim one.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin backvault --bin backvault-agent

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/backvault /src/target/release/backvault-agent /usr/local/bin/
COPY crates/agent/sample-inventory.toml /etc/backvault/sample-inventory.toml
# Owned by the user the containers run as, so that volumes mounted here are writable.
RUN mkdir -p /var/lib/backvault/enrollment /var/lib/backvault/agent \
    && chown -R nobody /var/lib/backvault
USER nobody
EXPOSE 8080
ENV BACKVAULT_LISTEN=0.0.0.0:8080
ENTRYPOINT ["backvault"]
CMD ["serve"]
