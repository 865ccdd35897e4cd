"""The Kimi K2.x text model and the K2.5/K2.6 vision model in PyTorch (one concept per file)."""

from kimi_grpc.model.forward_batch import ForwardBatch
from kimi_grpc.model.kimi import KimiForCausalLM
from kimi_grpc.model.vision import KimiVisionModel

__all__ = ["ForwardBatch", "KimiForCausalLM", "KimiVisionModel"]
