"""A node other than rank 0's (``serve --node-rank K``, K > 0): it hosts this node's ranks and
no gRPC server. Its first local rank runs in this process, the others as worker processes; the
node exits 0 when rank 0 sends SHUTDOWN, non-zero when any of its ranks fails.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kimi_grpc.parallel.distributed import ParallelConfig
from kimi_grpc.parallel.worker import WorkerSpec, run_worker
from kimi_grpc.parallel.worker_procs import LocalWorkers

logger = logging.getLogger("kimi_grpc.parallel")


def serve_node(
    model: str | None,
    revision: str | None,
    device: str,
    dtype: str,
    parallel: ParallelConfig,
    engine_args: dict[str, Any],
) -> int:
    from kimi_grpc import ops
    from kimi_grpc.checkpoint import resolve_model_path
    from kimi_grpc.checkpoint_maker import demo_checkpoint
    from kimi_grpc.config import EngineConfig
    from kimi_grpc.model.dtype import resolve_dtype
    from kimi_grpc.parallel.memory_plan import plan_or_refuse

    path = resolve_model_path(model, revision) if model else demo_checkpoint()
    engine = EngineConfig(**engine_args)
    plan_or_refuse(path, parallel, engine, resolve_dtype(dtype, device), device)  # this node's GPUs
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    spec = WorkerSpec(str(path), parallel, device, dtype, ops.backend(), engine_args, level)
    first = parallel.first_local_rank
    ranks = list(range(first + 1, first + parallel.local_size))

    def lost(message: str) -> None:
        logger.error("node %d: %s; exiting", parallel.node_rank, message)
        workers.kill()
        logging.shutdown()
        os._exit(1)

    workers = LocalWorkers(spec, ranks, lost)
    logger.info(
        "node %d hosts ranks %d..%d", parallel.node_rank, first, ranks[-1] if ranks else first
    )
    try:
        run_worker(spec, first)
    except BaseException as exc:
        logger.error("node %d: rank %d failed: %r", parallel.node_rank, first, exc)
        workers.kill()
        logging.shutdown()
        os._exit(1)
    workers.stop()
    return 0
