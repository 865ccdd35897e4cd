"""The Kimi K2.x text model in PyTorch (layers, one concept per file)."""

from kimi_grpc.model.forward_batch import ForwardBatch
from kimi_grpc.model.kimi import KimiForCausalLM

__all__ = ["ForwardBatch", "KimiForCausalLM"]
