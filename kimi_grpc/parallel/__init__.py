"""Tensor-parallel process groups (single process until the scale-out work lands)."""

from kimi_grpc.parallel.state import ParallelContext, shard_range

__all__ = ["ParallelContext", "shard_range"]
