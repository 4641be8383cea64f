# memdial node image: docker build -t memdial . ; docker-compose.yml runs a
# 3-node cluster of it. Alone it runs one node with the embedded store:
#   docker run --rm -p 8000:8000 -p 9000:9000 memdial

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, built against stub sources: this layer is rebuilt only
# when Cargo.toml or Cargo.lock change, not for every source edit. Cargo
# reads every target Cargo.toml names, so each bench gets a stub too
# (tests/deploy.rs runs this step).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for b in $(sed -n '/^\[\[bench\]\]/,/^name/ s/^name = "\(.*\)"/\1/p' Cargo.toml); do \
        echo 'fn main() {}' > "benches/$b.rs"; done
RUN cargo build --profile production --locked --bin memdial \
    && rm -rf src benches target/production/.fingerprint/memdial-*
# Then memdial itself (the benches only because Cargo.toml names them).
COPY src ./src
COPY benches ./benches
RUN cargo build --profile production --locked --bin memdial

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 memdial \
    && useradd --system --uid 10001 --gid memdial --no-create-home --shell /usr/sbin/nologin memdial
COPY --from=build /src/target/production/memdial /usr/local/bin/memdial
COPY proxy.yaml /etc/memdial/proxy.yaml
COPY deploy/proxy.compose.yaml /etc/memdial/proxy.compose.yaml
# Numeric, so that runtimes checking for non-root need not read /etc/passwd.
USER 10001:10001
EXPOSE 8000 7000 9000
# Needs the readiness endpoint (/ready) on the admin port.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 \
    CMD ["memdial", "probe", "--url", "http://127.0.0.1:9000/ready"]
ENTRYPOINT ["memdial"]
CMD ["serve", "--listen", "0.0.0.0:8000", "--admin", "0.0.0.0:9000"]
