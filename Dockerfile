# memdial node image: docker build -t memdial . ; see docker-compose.yml.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin memdial

FROM debian:bookworm-slim
COPY --from=build /src/target/release/memdial /usr/local/bin/memdial
COPY proxy.yaml /etc/memdial/proxy.yaml
EXPOSE 8000 7000 9000
ENTRYPOINT ["memdial"]
CMD ["serve", "--config", "/etc/memdial/proxy.yaml", "--node", "1"]
