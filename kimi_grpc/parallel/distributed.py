"""Where the tensor-parallel ranks are and how they meet: the layout flags and the process groups.

Ranks: ``tensor_parallel_size`` processes over ``nnodes`` nodes, ``local_size`` per node; global
rank = ``node_rank * local_size + local_rank``; rank 0 (node 0) runs the scheduler, the sampler
and the gRPC server. Three groups (plus, with ``decode_context_parallel_size`` N > 1, one group of
N consecutive ranks per N, on the model group's backend, for the DCP attention collectives):

* WORLD (gloo, ``startup_timeout``): rendezvous and the post-load agreement, which waits for the
  slowest rank's weight loading;
* control (gloo, ``collective_timeout``): rank 0's step messages (CPU tensors, never pickled);
* model (gloo on CPU, NCCL on CUDA, ``collective_timeout``): the layers' all-reduce/all-gather.

A timed-out or failed collective raises, so a dead peer ends the process instead of hanging it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kimi_grpc import envs
from kimi_grpc.parallel.state import MOE_PARALLEL_MODES, MoEParallel, ParallelContext


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    moe_parallel: MoEParallel = "tp"
    # Ranks sharing one copy of the latent cache, each holding every N-th token (1: replicated).
    decode_context_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: rank 0 picks a free loopback port (single node only)
    collective_timeout: float = 60.0  # seconds one step's collective may take
    startup_timeout: float = 1800.0  # seconds for rendezvous + the slowest rank's weight load
    heartbeat_interval: float | None = None  # rank 0 pings idle workers; None: min(5, timeout/4)

    def __post_init__(self) -> None:
        tp, nodes = self.tensor_parallel_size, self.nnodes
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        if nodes < 1 or tp % nodes:
            raise ValueError(f"tensor_parallel_size={tp} does not split over nnodes={nodes}")
        if not 0 <= self.node_rank < nodes:
            raise ValueError(f"node_rank={self.node_rank} outside nnodes={nodes}")
        if self.moe_parallel not in MOE_PARALLEL_MODES:
            raise ValueError(f"moe_parallel={self.moe_parallel!r}: expected tp or ep")
        dcp = self.decode_context_parallel_size
        if not isinstance(dcp, int) or dcp < 1 or tp % dcp:
            raise ValueError(
                f"decode_context_parallel_size={dcp!r} must be a positive divisor of "
                f"tensor_parallel_size={tp} (the DCP groups are made of TP ranks)"
            )
        if (tp // nodes) % dcp:
            raise ValueError(
                f"decode_context_parallel_size={dcp} does not divide the {tp // nodes} ranks per "
                "node: a DCP group would span nodes (its collectives run in every layer)"
            )
        if nodes > 1 and self.master_port == 0:
            raise ValueError("multi-node needs --master-addr and --master-port (or MASTER_PORT)")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"master_port={self.master_port} is not a TCP port")
        for name in ("collective_timeout", "startup_timeout", "heartbeat_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.heartbeat_s * 2 > self.collective_timeout:
            raise ValueError("heartbeat_interval must be under half the collective_timeout")

    @property
    def heartbeat_s(self) -> float:
        if self.heartbeat_interval is not None:
            return self.heartbeat_interval
        return min(5.0, self.collective_timeout / 4)

    @property
    def local_size(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    @property
    def first_local_rank(self) -> int:
        return self.node_rank * self.local_size

    @classmethod
    def from_env(cls, **overrides) -> ParallelConfig:
        """Layout from ``MASTER_ADDR``/``MASTER_PORT``/``NNODES``/``NODE_RANK`` (the standard
        torchrun / LeaderWorkerSet variables; ``LWS_LEADER_ADDRESS`` as the master address), with
        explicit (not None) ``overrides`` taking precedence."""
        env: dict[str, object] = {}
        addr = envs.MASTER_ADDR.get() or envs.LWS_LEADER_ADDRESS.get()
        if addr:
            env["master_addr"] = addr
        for var, key in (
            (envs.MASTER_PORT, "master_port"),
            (envs.NNODES, "nnodes"),
            (envs.NODE_RANK, "node_rank"),
        ):
            if var.get():
                env[key] = _env_int(var)
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)


def _env_int(var: envs.EnvVar) -> int:
    try:
        return int(var.get())
    except ValueError:
        raise ValueError(f"{var.name}={var.get()!r} is not an integer") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RankGroups:
    rank: int
    ctx: ParallelContext  # the model's view: rank, size, model group, moe mode
    control: object  # gloo group of the step messages


def rank_device(device: str, local_rank: int) -> torch.device:
    """``cuda:<local_rank>`` on CUDA (one GPU per rank), else the CPU."""
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_groups(config: ParallelConfig, rank: int, device: torch.device) -> RankGroups:
    """Joins the rendezvous as global ``rank`` and creates the control and model groups."""
    world = config.tensor_parallel_size
    dist.init_process_group(
        backend="gloo",
        init_method=f"tcp://{_url_host(config.master_addr)}:{config.master_port}",
        world_size=world,
        rank=rank,
        timeout=timedelta(seconds=config.startup_timeout),
    )
    step_timeout = timedelta(seconds=config.collective_timeout)
    control = dist.new_group(backend="gloo", timeout=step_timeout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    model = dist.new_group(backend=backend, timeout=step_timeout)
    dcp, dcp_group = config.decode_context_parallel_size, None
    if dcp > 1:  # every rank creates every group, in the same order
        for first in range(0, world, dcp):
            group = dist.new_group(
                list(range(first, first + dcp)), backend=backend, timeout=step_timeout
            )
            if first <= rank < first + dcp:
                dcp_group = group
    ctx = ParallelContext(
        tp_rank=rank,
        tp_size=world,
        group=model,
        moe_parallel=config.moe_parallel,
        dcp_size=dcp,
        dcp_group=dcp_group,
    )
    return RankGroups(rank, ctx, control)


def agree_after_load(local_pages: int, weight_bytes: int) -> tuple[int, list[int]]:
    """Waits (WORLD timeout) for every rank to finish loading; returns the KV page count all
    ranks can hold (the minimum) and every rank's weight bytes (for rank 0's report)."""
    mine = torch.tensor([local_pages, weight_bytes], dtype=torch.int64)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return min(int(p[0]) for p in parts), [int(p[1]) for p in parts]


def destroy_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
