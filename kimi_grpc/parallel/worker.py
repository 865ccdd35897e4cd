"""A tensor-parallel worker rank: load this rank's shard, then run every forward rank 0 sends.

Started by rank 0 (or by a node's leader on other nodes) as
``python -m kimi_grpc.parallel.worker --rank R --spec JSON``; the spec is plain JSON (never
pickle). The worker exits 0 on SHUTDOWN, and non-zero with one log line when a collective fails or
times out, or when its parent dies (its stdin pipe reaches EOF) — never a hang, never an orphan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from kimi_grpc.parallel.distributed import ParallelConfig

logger = logging.getLogger("kimi_grpc.worker")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build the same model and cache as rank 0."""

    model_path: str
    parallel: ParallelConfig
    device: str = "cpu"
    dtype: str = "auto"
    ops: str | None = None  # hot-op backend; None = the default (env KIMI_GRPC_OPS)
    engine_args: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields
    log_level: str = "INFO"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        raw = json.loads(text)
        raw["parallel"] = ParallelConfig(**raw["parallel"])
        return cls(**raw)


def run_worker(spec: WorkerSpec, rank: int) -> None:
    """Joins the group as ``rank``, loads the shard and serves steps until SHUTDOWN."""
    from kimi_grpc import ops
    from kimi_grpc.config import EngineConfig
    from kimi_grpc.model import ForwardBatch
    from kimi_grpc.model.dtype import resolve_dtype
    from kimi_grpc.parallel.distributed import (
        agree_after_load,
        destroy_groups,
        init_groups,
        rank_device,
    )
    from kimi_grpc.parallel.executor import RankExecutor
    from kimi_grpc.parallel.step_channel import StepReceiver
    from kimi_grpc.parallel.step_codec import Op

    if spec.ops:
        ops.set_backend(spec.ops)
    pcfg = spec.parallel
    device = rank_device(spec.device, rank % pcfg.local_size)
    split_cpu_threads(spec.device, pcfg.local_size)
    groups = init_groups(pcfg, rank, device)
    executor = RankExecutor.load(
        spec.model_path,
        EngineConfig(**spec.engine_args),
        dtype=resolve_dtype(spec.dtype, spec.device),
        device=device,
        ctx=groups.ctx,
        agree=lambda pages, weight_bytes: agree_after_load(pages, weight_bytes)[0],
    )
    logger.info(
        "rank %d ready: %.1f MB of weights, %d KV pages",
        rank,
        executor.weight_bytes / 1e6,
        executor.cache.num_pages,
    )
    receiver = StepReceiver(groups.control)
    while True:
        msg = receiver.recv()
        if msg.op is Op.SHUTDOWN:
            break
        if msg.op is Op.STEP:
            batch = ForwardBatch.build(
                msg.token_ids,
                msg.context_lens,
                msg.block_tables,
                msg.page_size,
                device,
                media_rows=msg.media_rows,
                kv_saves=msg.kv_saves,
                kv_loads=msg.kv_loads,
                dcp_rank=groups.ctx.dcp_rank,
                dcp_size=groups.ctx.dcp_size,
            )
            executor.forward(batch)
    destroy_groups()


def split_cpu_threads(device: str, local_size: int) -> None:
    """CPU ranks of one node share its cores instead of each spawning one thread per core."""
    if device == "cpu" and local_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))


_shutting_down = threading.Event()


def _exit_when_parent_dies(rank: int) -> None:
    """The parent holds our stdin's write end; EOF means it exited (even by SIGKILL)."""
    while os.read(0, 4096):  # the raw fd: no buffered-reader lock to trip interpreter exit
        pass
    if not _shutting_down.is_set():
        logger.error("rank %d: the parent process is gone; exiting", rank)
        logging.shutdown()
        os._exit(3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimi_grpc.parallel.worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--spec", required=True, help="WorkerSpec as JSON")
    args = parser.parse_args(argv)
    spec = WorkerSpec.from_json(args.spec)
    logging.basicConfig(
        level=spec.log_level.upper(),
        format=f"%(asctime)s %(levelname)s rank{args.rank} %(name)s: %(message)s",
    )
    threading.Thread(target=_exit_when_parent_dies, args=(args.rank,), daemon=True).start()
    try:
        run_worker(spec, args.rank)
    except BaseException as exc:  # a failed collective, a timeout, a load error: die loudly
        logger.error("rank %d failed: %s: %s; exiting", args.rank, type(exc).__name__, exc)
        logging.shutdown()
        os._exit(1)  # skip process-group destructors, which may block on a dead peer
    _shutting_down.set()
    logger.info("rank %d: shut down", args.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
