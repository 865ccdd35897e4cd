"""kimi-grpc: a self-hosted gRPC inference server for Moonshot's Kimi K2.x (DeepSeek-V3 MoE)."""

from kimi_grpc.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy: importing kimi_grpc (e.g. from the gRPC layer) must not import torch.
    if name == "LLM":
        from kimi_grpc.engine.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from kimi_grpc.engine.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(f"module 'kimi_grpc' has no attribute {name!r}")
