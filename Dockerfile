# tidepool's image: built in one stage, run from a small one as a non-root
# user. `docker compose up` (docker-compose.yml) builds it; alone:
#   docker build -t tidepool . && docker run -v $PWD/proxy.toml:/etc/tidepool/proxy.toml -p 6432:6432 tidepool

FROM rust:1-bookworm AS build
# pg_query (PostgreSQL's parser) generates its bindings with bindgen.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libclang-dev clang \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# No debug information in the image's binary (the repository's release
# profile keeps it for profiling).
RUN CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --locked --bin tidepool

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tidepool
COPY --from=build /src/target/release/tidepool /usr/local/bin/tidepool
COPY deploy/proxy.toml /etc/tidepool/proxy.toml
USER 10001:10001
EXPOSE 6432 9930
# Alive means: the config parses, the client port accepts and /healthz answers.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["tidepool", "check", "--config", "/etc/tidepool/proxy.toml", "--probe"]
ENTRYPOINT ["tidepool", "--config", "/etc/tidepool/proxy.toml"]
