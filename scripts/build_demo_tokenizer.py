#!/usr/bin/env python3
"""Train the project's small demo BPE vocabulary (tiktoken format) from scripts/demo_corpus.txt.

Byte-level BPE: ranks 0..255 are the single bytes (so every string round-trips), the corpus is
pre-tokenized with Kimi's ``pat_str`` via the ``regex`` module in VERSION1 mode, and merges are
learned greedily by pair frequency (ties: smallest (left, right) byte strings) until the base
vocabulary has ``--num-base-tokens`` entries. The 256 special ids follow the base vocabulary with
Kimi K2.6's exact offsets. Output is deterministic: same corpus and flags -> identical bytes.

    python scripts/build_demo_tokenizer.py [--num-base-tokens 1792] [--out DIR] [--corpus FILE]
"""

from __future__ import annotations

import argparse
import base64
import heapq
import json
from itertools import pairwise
from pathlib import Path

import regex

from kimi_grpc.tokenizer import PAT_STR

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT / "scripts" / "demo_corpus.txt"
DEFAULT_OUT = ROOT / "kimi_grpc" / "assets" / "demo_tokenizer"
DEFAULT_NUM_BASE_TOKENS = 1792

# Kimi K2.6 special tokens as (offset from num_base_tokens, content, HF "special" flag);
# real ids are 163584 + offset (docs/kimi-spec.md 3.2). Offsets 5, 8, 16, 24..253 are unnamed.
SPECIAL_LAYOUT: list[tuple[int, str, bool]] = [
    (0, "[BOS]", True),
    (1, "[EOS]", True),
    (2, "<|im_end|>", True),
    (3, "<|im_user|>", True),
    (4, "<|im_assistant|>", True),
    (6, "<|start_header_id|>", True),
    (7, "<|end_header_id|>", True),
    (9, "[EOT]", True),
    (10, "<|im_system|>", True),
    (11, "<|tool_calls_section_begin|>", False),
    (12, "<|tool_calls_section_end|>", False),
    (13, "<|tool_call_begin|>", False),
    (14, "<|tool_call_argument_begin|>", False),
    (15, "<|tool_call_end|>", False),
    (17, "<|im_middle|>", True),
    (18, "<|media_begin|>", True),
    (19, "<|media_content|>", True),
    (20, "<|media_end|>", True),
    (21, "<|media_pad|>", True),
    (22, "<think>", False),
    (23, "</think>", False),
    (254, "[UNK]", True),
    (255, "[PAD]", True),
]
ADDITIONAL_SPECIAL_TOKENS = [
    "<|im_end|>",
    "<|im_user|>",
    "<|im_assistant|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    "<|im_system|>",
    "<|im_middle|>",
    "<|media_begin|>",
    "<|media_content|>",
    "<|media_end|>",
    "<|media_pad|>",
]
MODEL_MAX_LENGTH = int(1e30)  # 1000000000000000019884624838656, as in the real config

Pair = tuple[bytes, bytes]


def pretokenize(text: str) -> dict[bytes, int]:
    """Count Kimi pre-tokenizer pieces (UTF-8 bytes) in first-seen order."""
    counts: dict[bytes, int] = {}
    for piece in regex.compile(PAT_STR, regex.V1).findall(text):
        key = piece.encode("utf-8")
        counts[key] = counts.get(key, 0) + 1
    return counts


def train_bpe(text: str, num_base_tokens: int) -> dict[bytes, int]:
    """Greedy byte-level BPE; returns token bytes -> rank for ranks 0..num_base_tokens-1."""
    if num_base_tokens < 256:
        raise ValueError("num_base_tokens must be >= 256 (all single bytes)")
    ranks = {bytes([b]): b for b in range(256)}
    word_freq = pretokenize(text)
    words = [[bytes([b]) for b in w] for w in word_freq]
    freqs = list(word_freq.values())
    pair_count: dict[Pair, int] = {}
    where: dict[Pair, set[int]] = {}
    for wi, w in enumerate(words):
        for p in pairwise(w):
            pair_count[p] = pair_count.get(p, 0) + freqs[wi]
            where.setdefault(p, set()).add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    while len(ranks) < num_base_tokens:
        while heap:
            neg, a, b = heapq.heappop(heap)
            if pair_count.get((a, b), 0) == -neg > 0:
                break
        else:
            raise ValueError(f"corpus too small: only {len(ranks)} tokens could be learned")
        merged = a + b
        if merged not in ranks:
            ranks[merged] = len(ranks)
        changed: set[Pair] = set()
        for wi in sorted(where.pop((a, b), ())):
            old, f = words[wi], freqs[wi]
            new: list[bytes] = []
            i = 0
            while i < len(old):
                if i + 1 < len(old) and old[i] == a and old[i + 1] == b:
                    new.append(merged)
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            for p in pairwise(old):
                pair_count[p] -= f
                changed.add(p)
            for p in pairwise(new):
                pair_count[p] = pair_count.get(p, 0) + f
                changed.add(p)
            new_pairs = set(pairwise(new))
            for p in set(pairwise(old)) - new_pairs:
                if p in where:
                    where[p].discard(wi)
            for p in new_pairs:
                where.setdefault(p, set()).add(wi)
            words[wi] = new
        pair_count[(a, b)] = 0
        for p in sorted(changed):
            if pair_count.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_count[p], p[0], p[1]))
    return ranks


def tokenizer_config(num_base_tokens: int) -> dict[str, object]:
    added = {
        str(num_base_tokens + off): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for off, content, special in SPECIAL_LAYOUT
    }
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }


def build(corpus: Path, out: Path, num_base_tokens: int) -> None:
    text = corpus.read_text(encoding="utf-8")
    ranks = train_bpe(text, num_base_tokens)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    (out / "tiktoken.model").write_bytes("".join(lines).encode("ascii"))
    cfg = json.dumps(tokenizer_config(num_base_tokens), indent=2, ensure_ascii=False) + "\n"
    (out / "tokenizer_config.json").write_bytes(cfg.encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-base-tokens", type=int, default=DEFAULT_NUM_BASE_TOKENS)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    build(args.corpus, args.out, args.num_base_tokens)
    print(f"wrote {args.out} ({args.num_base_tokens} base tokens + 256 special)")


if __name__ == "__main__":
    main()
