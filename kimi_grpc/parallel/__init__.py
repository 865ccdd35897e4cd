"""Tensor/expert parallelism: the layers' collectives (state), the process groups
(distributed), rank 0's leader and the workers, the step wire format, and memory planning."""

from kimi_grpc.parallel.state import ParallelContext, shard_range

__all__ = ["ParallelContext", "shard_range"]
