"""``kimi-grpc`` command line: serve, generate (offline or --target), chat, agent, swarm,
make-checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kimi_grpc import cli_remote
from kimi_grpc.checkpoint import CheckpointError
from kimi_grpc.config import ConfigError
from kimi_grpc.swarm import command as swarm_command

if TYPE_CHECKING:
    from kimi_grpc.engine.llm import LLM
    from kimi_grpc.media import MediaLimits
    from kimi_grpc.media.request import ChatPrompt

MIB = 1024 * 1024

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


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensor parallelism (one process per GPU; gloo on the CPU)")
    g.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, help="ranks in all (default 1)"
    )
    g.add_argument(
        "--moe-parallel",
        choices=("tp", "ep"),
        default="tp",
        help="routed experts: tp = a slice of every expert per rank (lowest latency at small "
        "batch), ep = whole experts per rank (docs/PARALLEL.md)",
    )
    g.add_argument(
        "--decode-context-parallel-size",
        "-dcp",
        type=int,
        default=1,
        help="ranks (dividing the TP size) that share one copy of the KV cache, each holding "
        "every N-th token: N times the context capacity, prefix caching at page_size x N tokens "
        "(default 1: every rank holds every token; docs/PARALLEL.md)",
    )
    g.add_argument("--nnodes", type=int, help="nodes (env NNODES; default 1)")
    g.add_argument("--node-rank", type=int, help="this node's index (env NODE_RANK; default 0)")
    g.add_argument("--master-addr", help="rank 0's address (env MASTER_ADDR; default loopback)")
    g.add_argument("--master-port", type=int, help="rendezvous port (env MASTER_PORT)")
    g.add_argument(
        "--collective-timeout",
        type=float,
        default=60.0,
        help="seconds a step's collective may take before the server gives up",
    )


def parallel_config(args: argparse.Namespace):
    from kimi_grpc.parallel.distributed import ParallelConfig

    return ParallelConfig.from_env(
        tensor_parallel_size=args.tensor_parallel_size,
        moe_parallel=args.moe_parallel,
        decode_context_parallel_size=args.decode_context_parallel_size,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        collective_timeout=args.collective_timeout,
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
    mk.add_argument("--preset", required=True, help="demo | demo-vl | k2-shape-layers2 | bench-2g")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--max-shard-size", type=int, default=2 * 1024**3, help="bytes per shard")

    _add_serve_parser(sub)

    gen = sub.add_parser(
        "generate", help="generate from a prompt: offline (--model) or on a server (--target)"
    )
    _add_model_args(gen)
    _add_parallel_args(gen)
    cli_remote.add_target_args(gen)
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
    gen.add_argument("--json", action="store_true", help="print JSON (lines when streaming)")
    chat = gen.add_argument_group("chat (offline only)")
    chat.add_argument(
        "--chat",
        action="store_true",
        help="render --prompt as one user message through the checkpoint's chat template, "
        "with the generation prompt",
    )
    cli_remote.add_media_file_args(chat, "the --chat message, before its text")
    chat.add_argument(
        "--mode",
        choices=("instant", "thinking"),
        help="the template's thinking switch for --chat (default thinking)",
    )

    for name, help_text in (
        (
            "chat",
            "interactive chat with a server (/image PATH, /video PATH, /mode instant|thinking, "
            "/reset, /exit)",
        ),
        ("agent", "run a tool loop against a server's AgentStep with local command tools"),
    ):
        p = sub.add_parser(name, help=help_text)
        cli_remote.add_target_args(p)
        p.add_argument("--mode", choices=("instant", "thinking", "agent"), default="thinking")
        p.add_argument("--system", help="system prompt")
        p.add_argument("--thinking-budget", type=int, help="reasoning tokens before </think>")
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-p", type=float)
        p.add_argument("--max-tokens", type=int)
        p.add_argument("--seed", type=int)
        p.add_argument("--hide-reasoning", action="store_true")
        if name == "chat":
            p.description = (
                "Each line is a user turn, or: /image PATH and /video PATH attach a file to the "
                "next turn; /mode instant|thinking; /reset forgets the history and queued files; "
                "/exit. Attached files stay in the history, so every later turn sends them again "
                "(as OpenAI-style APIs do)."
            )
            cli_remote.add_media_file_args(p, "the first message")
        if name == "agent":
            p.add_argument("--tools", required=True, help="JSON list of tools with commands")
            p.add_argument("--task", required=True, help="the user's request")
            p.add_argument("--max-steps", type=int, default=16)
            p.add_argument(
                "--tool-choice", help="first step only: auto | none | required | a tool name"
            )
            p.add_argument("--json", action="store_true", help="one JSON line per step")
    swarm_command.add_parser(sub)
    return parser


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="start the gRPC server")
    _add_model_args(srv)
    _add_parallel_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    srv.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    srv.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="sequences allowed to wait beyond --max-num-seqs; then RESOURCE_EXHAUSTED",
    )
    srv.add_argument("--max-num-seqs", type=int, help="sequences running at once (default 256)")
    srv.add_argument("--max-num-batched-tokens", type=int, help="tokens per engine step")
    srv.add_argument("--kv-cache-memory", type=int, help="bytes for the latent KV cache")
    srv.add_argument(
        "--host-kv-cache-memory",
        type=int,
        help="bytes of host memory for evicted KV pages (prefix-cache hits load them back "
        "instead of recomputing); default 0 = off",
    )
    srv.add_argument(
        "--kv-retention-seconds",
        type=float,
        help="with the host tier: how long a session (session_id) whose AgentStep ended in tool "
        "calls keeps its pages there for its next step (default 180)",
    )
    srv.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    srv.add_argument("--no-prefix-caching", action="store_true")
    srv.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="tokens per streamed message (Generate's stream_interval overrides it; default 1: "
        "every token at once). Larger values cut the per-message cost at high concurrency",
    )
    srv.add_argument(
        "--stub-forward-ms",
        type=float,
        help="benchmarks only: replace the model's forward by a wait of this many milliseconds "
        "(the host path's ceiling; the streamed tokens are meaningless)",
    )
    srv.add_argument(
        "--no-overlap-scheduling",
        action="store_true",
        help="run each step's forward and host work one after the other (default: the forward "
        "runs on a device thread while the host prepares the next step and streams the last)",
    )
    srv.add_argument(
        "--guided-decoding",
        choices=("on", "off"),
        default="on",
        help="grammar-constrained tool calls and response formats (default on; a request can "
        "turn it off for itself)",
    )
    srv.add_argument(
        "--http-port",
        type=int,
        help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, ...) on this port "
        "(0 picks a free one); off unless given",
    )
    srv.add_argument(
        "--served-model-name",
        action="append",
        default=[],
        help="another name the HTTP API accepts for the model (repeatable)",
    )
    srv.add_argument("--api-key-file", help="file of accepted bearer tokens, one per line")
    srv.add_argument("--tls-cert", help="PEM certificate chain")
    srv.add_argument("--tls-key", help="PEM private key")
    srv.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds after SIGTERM")
    srv.add_argument(
        "--max-message-mb",
        type=int,
        default=64,
        help="request size limit, gRPC messages and HTTP bodies (default 64; gRPC allows up to "
        "2047): an inline video must fit",
    )
    _add_media_args(srv)
    srv.add_argument("--no-reflection", action="store_true", help="disable server reflection")
    srv.add_argument("--log-level", default="INFO")


# Media limit flags -> MediaLimits fields (unset flags keep MediaLimits' defaults, listed in
# docs/DEPLOY.md; the parser does not import the media stack just to print them).
MEDIA_FLAGS = (
    ("--max-media-items", int, "max_items", "images + videos per request (default 100)"),
    ("--max-image-mb", float, "max_image_bytes", "encoded MiB per image (default 20)"),
    ("--max-video-mb", float, "max_video_bytes", "encoded MiB per video (default 256)"),
    ("--max-image-pixels", int, "max_image_pixels", "decoded pixels per image (default 8192^2)"),
    ("--max-video-seconds", float, "max_video_seconds", "duration per video (default 600)"),
    ("--max-video-frames", int, "max_video_frames", "sampled frames per video (default 1200)"),
    ("--max-media-tokens", int, "max_media_tokens", "media tokens per request (default 131072)"),
)


def _add_media_args(srv: argparse.ArgumentParser) -> None:
    media = srv.add_argument_group("images and video (checkpoints with a vision tower)")
    for flag, kind, _, what in MEDIA_FLAGS:
        media.add_argument(flag, type=kind, help=what)
    media.add_argument(
        "--encoder-cache-tokens",
        type=int,
        help="vision embeddings kept for reuse, in tokens (default 16384)",
    )


def media_limits(args: argparse.Namespace) -> MediaLimits:
    """The serve command's media flags as MediaLimits (a bad value: ValueError naming it)."""
    from kimi_grpc.media import MediaLimits

    values = {}
    for flag, _, name, _ in MEDIA_FLAGS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            values[name] = int(value * MIB) if name.endswith("_bytes") else value
    try:
        return MediaLimits(**values)
    except ValueError as exc:
        raise ValueError(f"media limits: {exc}") from None


def _cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from kimi_grpc.checkpoint_maker import make_checkpoint

    out = make_checkpoint(
        args.out_dir, args.preset, seed=args.seed, max_shard_bytes=args.max_shard_size
    )
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import os

    from kimi_grpc import ops
    from kimi_grpc.server.app import ServerConfig, ServerFailed, serve

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.ops:
        ops.set_backend(args.ops)
    engine_args = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_memory": args.kv_cache_memory,
        "host_kv_cache_memory": args.host_kv_cache_memory,
        "kv_retention_seconds": args.kv_retention_seconds,
        "max_model_len": args.max_model_len,
        "encoder_cache_tokens": args.encoder_cache_tokens,
    }
    engine_args = {k: v for k, v in engine_args.items() if v is not None}
    if args.no_prefix_caching:
        engine_args["enable_prefix_caching"] = False
    if args.no_overlap_scheduling:
        engine_args["overlap_scheduling"] = False
    engine_args["guided_decoding"] = args.guided_decoding == "on"
    if args.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    if args.max_queued_requests > 0:
        # The engine queue must hold every admitted sequence; admission is counted in the server.
        engine_args["max_waiting"] = args.max_queued_requests + (args.max_num_seqs or 256)
    parallel = parallel_config(args)
    if parallel.node_rank > 0:  # no gRPC server here: host this node's ranks until rank 0 ends
        from kimi_grpc.parallel.node import serve_node

        return serve_node(args.model, args.revision, args.device, args.dtype, parallel, engine_args)
    config = ServerConfig(
        model=args.model,
        revision=args.revision,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        max_queued_requests=args.max_queued_requests,
        api_key_file=args.api_key_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        served_model_names=tuple(args.served_model_name),
        drain_timeout=args.drain_timeout,
        max_message_bytes=args.max_message_mb * MIB,
        media_limits=media_limits(args),
        reflection=not args.no_reflection,
        engine_args=engine_args,
        parallel=parallel,
        stream_interval=args.stream_interval,
        stub_forward_seconds=None if args.stub_forward_ms is None else args.stub_forward_ms / 1e3,
    )
    try:
        asyncio.run(serve(config))
    except ServerFailed as exc:  # a lost rank: leave now, without waiting on stuck collectives
        print(f"kimi-grpc serve: fatal: {exc}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    if not args.chat and (args.media or args.mode):
        raise ValueError("--image, --video and --mode need --chat")
    if args.chat and args.prompt is None:
        raise ValueError("--chat takes --prompt text, not --prompt-ids")
    if args.target:
        if args.model:
            raise ValueError("give --model (offline) or --target (a server), not both")
        if args.chat:
            raise ValueError(
                "--chat runs offline (--model); with a server use kimi-grpc chat --target "
                "(it takes --image and --video too)"
            )
        return cli_remote.cmd_generate(args)
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
    parts = [cli_remote.media_part(kind, path, f"--{kind}") for kind, path in args.media]
    start = time.perf_counter()
    llm = LLM(
        args.model,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len,
        parallel=parallel_config(args),
    )
    loaded = time.perf_counter()
    with llm:
        if args.chat:
            chat = _chat_prompt(llm, args, parts)
            prompt, media = chat.token_ids, [chat.spans]
        else:
            prompt = args.prompt if args.prompt is not None else args.prompt_ids
            media = None
        result = llm.generate([prompt], params, media=media)[0]
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


def _chat_prompt(llm: LLM, args: argparse.Namespace, parts: list[dict]) -> ChatPrompt:
    """``generate --chat``: one user message (the media files in the order given, then the
    --prompt text) rendered with the generation prompt; a refused file is named by its flag."""
    from kimi_grpc.media import MediaError, MediaLimits
    from kimi_grpc.media.request import chat_prompt, load_chat

    vision = llm.engine.model.config.vision_config
    renderer, config = load_chat(llm.engine.model_path, llm.tokenizer, vision)
    limits = MediaLimits() if vision else None
    pad = {"pad_id": vision.media_placeholder_token_id} if vision else {}
    message = {"role": "user", "content": [*parts, {"type": "text", "text": args.prompt}]}
    try:
        return chat_prompt(
            renderer, [message], config, limits, thinking=args.mode != "instant", **pad
        )
    except MediaError as exc:
        flags = {
            f"messages[0].content[{j}]": f"--{kind} {file}"
            for j, (kind, file) in enumerate(args.media)
        }
        if exc.field not in flags:
            raise
        reason = exc.message.removeprefix(f"{exc.field}: ")
        raise ValueError(f"{flags[exc.field]}: {reason}") from None


COMMANDS = {
    "make-checkpoint": _cmd_make_checkpoint,
    "serve": _cmd_serve,
    "generate": _cmd_generate,
    "chat": lambda args: cli_remote.cmd_chat(_require_target(args)),
    "agent": lambda args: cli_remote.cmd_agent(_require_target(args)),
    "swarm": swarm_command.cmd_swarm,
}


def _require_target(args: argparse.Namespace) -> argparse.Namespace:
    if not args.target:
        raise ValueError(f"{args.command} needs --target HOST:PORT of a running server")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, ValueError, RuntimeError) as exc:
        print(f"kimi-grpc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
