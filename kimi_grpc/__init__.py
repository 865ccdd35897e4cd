"""kimi-grpc: a self-hosted gRPC inference server for Moonshot's Kimi K2.x (DeepSeek-V3 MoE)."""

from kimi_grpc.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["SamplingParams", "__version__"]
