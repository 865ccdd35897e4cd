"""Generated gRPC stubs for protos/kimi/v1/inference.proto (``python scripts/gen_protos.py``)."""
