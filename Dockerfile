# vicuna in a container: `docker build -t vicuna .`, then
#   docker run --rm -p 8000:8000 -v /path/to/models:/models:ro vicuna \
#     serve --model /models/stable-vicuna-13b.q4_0.gguf --host 0.0.0.0 --port 8000
# Kubernetes manifests that run it behind an inference gateway: deploy/ (see deploy/README.md).

# Build stage: the release binary, from the locked dependency versions.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p vicuna && cp target/release/vicuna /vicuna

# Runtime stage: Debian slim with only the binary. vicuna makes no outgoing connections (no TLS),
# so no CA certificates; its CPU kernels are chosen at run time, so one image fits every x86-64 host.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin vicuna
COPY --from=builder /vicuna /usr/local/bin/vicuna
USER 10001:10001
# vicuna serve's port in deploy/ (its own default is 3000; the flag sets it).
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/vicuna"]
CMD ["serve", "--model", "/models/model.gguf", "--host", "0.0.0.0", "--port", "8000"]
