"""The OpenAI-compatible HTTP API (``kimi-grpc serve --http-port``), served next to gRPC in the
same process and event loop, over the same engine, admission control, keys, metrics and drain."""
