"""What the node's GPUs offer, asked through cuda-python before torch touches CUDA.

``cuda.bindings.driver`` (the optional ``gpu`` extra, ``pip install kimi-grpc[gpu]``) answers
without creating torch's contexts: device count, name, total memory, free memory (through a
briefly retained primary context, released again), and peer access between every pair. Without
cuda-python the query returns None and the planner falls back to what torch reports later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger("kimi_grpc.parallel")


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class NodeDevices:
    devices: list[DeviceInfo]
    peer_access: dict[tuple[int, int], bool]  # (i, j) -> can device i access j's memory

    def missing_peers(self, count: int) -> list[tuple[int, int]]:
        """Ordered pairs among the first ``count`` devices without peer access."""
        return [
            (i, j)
            for i in range(count)
            for j in range(count)
            if i != j and not self.peer_access.get((i, j), False)
        ]


class CudaQueryError(RuntimeError):
    """The driver refused a query (no driver, no device, a broken GPU)."""


def query_cuda_devices() -> NodeDevices | None:
    """The node's GPUs, or None when cuda-python is not installed."""
    try:
        from cuda.bindings import driver
    except ImportError:
        logger.info("cuda-python is not installed (the gpu extra): skipping the GPU pre-check")
        return None

    def call(fn, *args):
        err, *out = fn(*args)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise CudaQueryError(f"{fn.__name__}{args}: {err}")
        return out[0] if len(out) == 1 else out

    try:
        call(driver.cuInit, 0)
    except Exception as exc:  # no driver library, no device: torch would fail the same way
        raise CudaQueryError(f"the NVIDIA driver does not answer: {exc}") from exc
    count = call(driver.cuDeviceGetCount)
    handles = [call(driver.cuDeviceGet, i) for i in range(count)]
    devices = []
    for i, dev in enumerate(handles):
        name = call(driver.cuDeviceGetName, 256, dev).split(b"\0", 1)[0].decode()
        ctx = call(driver.cuDevicePrimaryCtxRetain, dev)
        try:
            call(driver.cuCtxPushCurrent, ctx)
            free, total = call(driver.cuMemGetInfo)
            call(driver.cuCtxPopCurrent)
        finally:
            call(driver.cuDevicePrimaryCtxRelease, dev)
        devices.append(DeviceInfo(i, name, int(total), int(free)))
    peers = {
        (i, j): bool(call(driver.cuDeviceCanAccessPeer, handles[i], handles[j]))
        for i in range(count)
        for j in range(count)
        if i != j
    }
    return NodeDevices(devices, peers)


def device_alive(index: int) -> str | None:
    """None when GPU ``index`` answers a memory query through torch, else why not (liveness)."""
    import torch

    try:
        torch.cuda.mem_get_info(index)
    except RuntimeError as exc:
        return f"GPU {index} does not answer: {exc}"
    return None
