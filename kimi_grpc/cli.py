"""``kimi-grpc`` command line: make-checkpoint, generate."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from kimi_grpc.checkpoint import CheckpointError
from kimi_grpc.config import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="checkpoint directory or Hugging Face repo id (default: the built-in demo model)",
    )
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to pin")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="compute dtype (auto: bfloat16 on cuda, float32 on cpu)",
    )
    p.add_argument(
        "--ops",
        choices=("auto", "native", "reference"),
        help="hot-op backend (env KIMI_GRPC_OPS); default auto",
    )


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids must be comma-separated integers: {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-grpc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random checkpoint in the real K2.6 layout")
    mk.add_argument("out_dir")
    mk.add_argument("--preset", required=True, help="demo | k2-shape-layers2 | bench-2g")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--max-shard-size", type=int, default=2 * 1024**3, help="bytes per shard")

    gen = sub.add_parser("generate", help="offline generation from a prompt")
    _add_model_args(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (special-token strings stay plain text)")
    prompt.add_argument("--prompt-ids", type=_parse_ids, help="comma-separated token ids")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--kv-cache-memory", type=int, help="bytes for the latent KV cache")
    gen.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from kimi_grpc.checkpoint_maker import make_checkpoint

    out = make_checkpoint(
        args.out_dir, args.preset, seed=args.seed, max_shard_bytes=args.max_shard_size
    )
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from kimi_grpc import ops
    from kimi_grpc.engine.llm import LLM
    from kimi_grpc.sampling_params import SamplingParams

    if args.ops:
        ops.set_backend(args.ops)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    start = time.perf_counter()
    llm = LLM(
        args.model,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len,
    )
    loaded = time.perf_counter()
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    result = llm.generate([prompt], params)[0]
    done = time.perf_counter()
    if args.json:
        record = {
            "model": str(llm.engine.model_path),
            "prompt_token_ids": result.prompt_token_ids,
            "token_ids": result.token_ids,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "num_cached_tokens": result.num_cached_tokens,
            "load_seconds": round(loaded - start, 3),
            "generate_seconds": round(done - loaded, 3),
        }
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(result.text)
        rate = len(result.token_ids) / max(done - loaded, 1e-9)
        print(
            f"[{len(result.token_ids)} tokens, finish_reason={result.finish_reason}, "
            f"{rate:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


COMMANDS = {"make-checkpoint": _cmd_make_checkpoint, "generate": _cmd_generate}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, ValueError, RuntimeError) as exc:
        print(f"kimi-grpc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
