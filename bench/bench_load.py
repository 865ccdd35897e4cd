"""Checkpoint load benchmark: load time and peak RSS against the checkpoint's tensor bytes.

    python bench/bench_load.py --preset bench-2g --dtype bfloat16 --workdir /tmp/kimi-bench

Builds the preset's checkpoint under ``--workdir`` if absent (not timed), then loads it in fresh
child processes, so each peak RSS (``ru_maxrss``) belongs to one load alone:

* ``loader``: ``KimiForCausalLM.from_checkpoint`` (shard-by-shard streaming, the real path);
* ``naive``: ``safetensors.torch.load_file`` of every shard into one dict, then the same
  per-tensor copies into a freshly built model (a loader that materialises the state dict).

Headline: ``(peak RSS - baseline RSS) / checkpoint tensor bytes`` — about 1.0 in bfloat16 means
no second copy, about 2.0 means one. A sampler thread also records the RssAnon / RssFile split
(``/proc/self/status``) at the highest RSS it saw: RssFile is mapped shard pages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

GIB = 1024**3
# The demo uses the same small shards as ``demo_checkpoint()``; others the maker's default.
SHARD_BYTES = {"demo": 2 * 1024**2}


def ensure_checkpoint(workdir: Path, preset: str) -> Path:
    target = workdir / preset
    if (target / "model.safetensors.index.json").exists():
        return target
    from kimi_grpc.checkpoint_maker import DEFAULT_SHARD_BYTES, make_checkpoint

    staging = workdir / f".{preset}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"building {preset} checkpoint in {target} (not timed) ...", file=sys.stderr)
    make_checkpoint(staging, preset, max_shard_bytes=SHARD_BYTES.get(preset, DEFAULT_SHARD_BYTES))
    staging.rename(target)
    return target


def _status_kib() -> dict[str, int]:
    with open("/proc/self/status") as f:
        rows = (line.split() for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile")))
        return {row[0].rstrip(":"): int(row[1]) for row in rows}


def sample_peak(stop: threading.Event, peak: list[dict[str, int]]) -> None:
    """Polls /proc/self/status until ``stop``; ``peak[0]`` ends as the sample with top VmRSS."""
    while not stop.wait(0.005):
        sample = _status_kib()
        if sample["VmRSS"] > peak[0]["VmRSS"]:
            peak[0] = sample


def child(mode: str, path: Path, dtype_name: str) -> dict[str, Any]:
    """Runs in a fresh interpreter: one load, measured from the inside."""
    import psutil
    import torch
    from safetensors.torch import load_file

    from kimi_grpc.checkpoint import CheckpointReader, TensorInfo
    from kimi_grpc.config import load_model_config
    from kimi_grpc.model.kimi import KimiForCausalLM

    dtype = getattr(torch, dtype_name)
    reader = CheckpointReader(path)  # headers only
    torch.ones(256, 256).sum()  # start the intra-op pool before the baseline
    proc = psutil.Process()
    baseline, maxrss_before = proc.memory_info().rss, resource.getrusage(resource.RUSAGE_SELF)
    peak, stop = [_status_kib()], threading.Event()
    base_sample, sampler = peak[0], threading.Thread(target=sample_peak, args=(stop, peak))
    sampler.start()
    start = time.perf_counter()
    if mode == "loader":
        model = KimiForCausalLM.from_checkpoint(path, dtype=dtype)
    else:
        state: dict[str, torch.Tensor] = {}
        for shard in sorted({info.file for info in reader.tensors.values()}):
            state.update(load_file(shard))

        class DictSlice:  # duck-types kimi_grpc.checkpoint.TensorSlice over the dict
            def __init__(self, info: TensorInfo) -> None:
                self.info, self.shape, self.dtype = info, info.shape, info.dtype

            def read(self) -> torch.Tensor:
                return state[self.info.name]

            def __getitem__(self, index: Any) -> torch.Tensor:
                return state[self.info.name][index]

        model = KimiForCausalLM(load_model_config(path), dtype=dtype)
        with torch.no_grad():
            for name, spec in model.weight_specs().items():
                spec.load(DictSlice(reader.tensors[name]))  # type: ignore[arg-type]
        model.eval()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak_sample = peak[0]
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "mode": mode,
        "load_s": seconds,
        "baseline_rss": baseline,
        "maxrss_before_load": maxrss_before.ru_maxrss * 1024,
        "peak_rss": maxrss,
        "rss_after_load": proc.memory_info().rss,
        # growth of anonymous / file-backed (mapped shard or library) pages at the sampled peak
        "peak_anon_growth": (peak_sample["RssAnon"] - base_sample["RssAnon"]) * 1024,
        "peak_file_growth": (peak_sample["RssFile"] - base_sample["RssFile"]) * 1024,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def run_child(mode: str, path: Path, dtype: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--path", str(path), "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    import psutil

    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    mem = psutil.virtual_memory().total / GIB
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()}"


def commit() -> str:
    """``git rev-parse --short HEAD`` of the imported kimi_grpc, + ``-dirty`` if it has edits."""
    import kimi_grpc

    git = ["git", "-C", str(Path(kimi_grpc.__file__).parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "-uno", "."], capture_output=True)
    return (head.stdout.strip() or "unknown") + ("-dirty" if dirty.stdout.strip() else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=("demo", "bench-2g"), default="demo")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/kimi-bench"))
    p.add_argument("--repeat", type=int, default=1, help="children per mode; fastest is kept")
    p.add_argument("--no-naive", action="store_true", help="skip the load_file baseline")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--child", choices=("loader", "naive"), help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path, args.dtype)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    path = ensure_checkpoint(args.workdir, args.preset)
    import safetensors
    import torch

    from kimi_grpc.checkpoint import CheckpointReader

    reader = CheckpointReader(path)
    ckpt_bytes = reader.total_bytes
    shards = sorted({info.file for info in reader.tensors.values()})
    result: dict[str, Any] = {
        "preset": args.preset,
        "dtype": args.dtype,
        "checkpoint": str(path),
        "checkpoint_bytes": ckpt_bytes,
        "shards": len(shards),
        "largest_shard_bytes": max(s.stat().st_size for s in shards),
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit(),
        "kimi_grpc": str(Path(sys.modules["kimi_grpc"].__file__ or "?").parent),
        "machine": machine(),
        "versions": f"torch {torch.__version__}, safetensors {safetensors.__version__}",
    }
    for mode in ("loader",) if args.no_naive else ("loader", "naive"):
        runs = [run_child(mode, path, args.dtype) for _ in range(args.repeat)]
        r = min(runs, key=lambda run: run["load_s"])
        r["load_s_all"] = [round(run["load_s"], 3) for run in runs]
        r["peak_minus_baseline"] = r["peak_rss"] - r["baseline_rss"]
        r["ratio"] = r["peak_minus_baseline"] / ckpt_bytes
        r["ratio_to_params"] = r["peak_minus_baseline"] / r["param_bytes"]
        result[mode] = r
    if args.json:
        print(json.dumps(result, indent=2))
        return
    mib = 1024**2
    print(
        f"{args.preset} ({args.dtype}): {ckpt_bytes / mib:.1f} MiB of tensors in {len(shards)} "
        f"shard(s), largest {result['largest_shard_bytes'] / mib:.1f} MiB; {result['machine']}"
    )
    cols = ("load s", "params", "baseline", "peak", "peak-base", "ratio", "+anon@pk", "+file@pk")
    print(f"{'(MiB)':8}" + "".join(f"{c:>10}" for c in cols))
    for mode in ("loader", "naive"):
        if mode in result:
            r = result[mode]
            keys = ("param_bytes", "baseline_rss", "peak_rss", "peak_minus_baseline")
            cells = [f"{r['load_s']:.2f}", *(f"{r[k] / mib:.1f}" for k in keys)]
            cells.append(f"{r['ratio']:.2f}")
            cells += [f"{r[k] / mib:.1f}" for k in ("peak_anon_growth", "peak_file_growth")]
            print(f"{mode:8}" + "".join(f"{c:>10}" for c in cells))


if __name__ == "__main__":
    main()
