"""Kimi K2.x tokenizer: tiktoken byte-level BPE plus 256 reserved special tokens.

Loads a checkpoint directory (``tiktoken.model`` + ``tokenizer_config.json``) without
transformers. Encoding policy: :meth:`KimiTokenizer.encode` treats special-token strings that
occur in text (e.g. a user typing ``<|im_end|>``) as PLAIN TEXT by default; only
``allow_special=True`` (meant for rendered chat templates) maps them to special ids. Kimi's own
``TikTokenTokenizer.encode`` defaults to the opposite, which lets user text inject turn markers.
Decoding replaces invalid UTF-8 with U+FFFD; ``skip_special_tokens`` drops the tokens HF would
drop (``"special": true`` entries, BOS/EOS/PAD/UNK and ``additional_special_tokens``) and keeps
``special: false`` markers such as ``<think>`` and the tool-call delimiters.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import operator
import re
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

import tiktoken

# Kimi's pre-tokenizer, verbatim (docs/kimi-spec.md 3.1). The ``&&`` class intersections need
# tiktoken's fancy-regex or the ``regex`` module in VERSION1 mode; V0 silently mis-parses them.
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
NUM_RESERVED_SPECIAL_TOKENS = 256
TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # Kimi: tiktoken handles <= 400k chars without panicking
MAX_NO_WHITESPACES_CHARS = 25_000  # Kimi: max run of (non-)whitespace chars per encode call
VOCAB_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
# Bytes that can occur in UTF-8 text (0xC0, 0xC1, 0xF5..0xFF never do); BPE needs each as a token.
_UTF8_BYTES = [*range(0x00, 0xC0), *range(0xC2, 0xF5)]


def demo_tokenizer_dir() -> Path:
    """Directory of the project's demo vocabulary (built by scripts/build_demo_tokenizer.py)."""
    return Path(__file__).resolve().parent / "assets" / "demo_tokenizer"


def split_long_runs(text: str, max_run: int = MAX_NO_WHITESPACES_CHARS) -> list[str]:
    """Cut ``text`` so no piece has more than ``max_run`` consecutive whitespace or
    non-whitespace characters (``str.isspace`` classes), exactly where Kimi's
    ``_split_whitespaces_or_nonwhitespaces`` cuts: every ``max_run`` chars inside a long run."""
    if len(text) <= max_run:
        return [text]
    cuts: list[int] = []
    # Every maximal run once (linear time): a pattern such as \S{25001,} is retried at each
    # start inside a shorter run, which is quadratic and held the GIL for seconds.
    for m in re.finditer(r"\s+|\S+", text):
        if m.end() - m.start() > max_run:
            cuts.extend(range(m.start() + max_run, m.end(), max_run))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (lines ``base64(token_bytes) rank``), validating every line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: tiktoken vocabulary file not found")
    ranks: dict[bytes, int] = {}
    seen: dict[int, int] = {}
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        parts = raw.split()
        if not parts:
            continue
        where = f"{path}:{lineno}"
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{where}: malformed line {raw[:80]!r}, expected 'base64(bytes) rank'")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{where}: invalid base64 token {parts[0][:80]!r}: {exc}") from None
        rank = int(parts[1])
        if not token:
            raise ValueError(f"{where}: empty token bytes")
        if token in ranks:
            raise ValueError(f"{where}: duplicate token {token!r} (also rank {ranks[token]})")
        if rank in seen:
            raise ValueError(f"{where}: duplicate rank {rank} (also on line {seen[rank]})")
        ranks[token] = rank
        seen[rank] = lineno
    _check_ranks(ranks, str(path))
    return ranks


def _check_ranks(ranks: Mapping[bytes, int], where: str) -> None:
    n = len(ranks)
    if n == 0:
        raise ValueError(f"{where}: vocabulary is empty")
    values = set(ranks.values())
    if len(values) != n or min(values) != 0 or max(values) != n - 1:
        missing = next((r for r in range(n) if r not in values), n)
        raise ValueError(
            f"{where}: ranks are not contiguous 0..{n - 1} ({n} tokens, max rank "
            f"{max(values)}, first missing rank {missing})"
        )
    lost = [b for b in _UTF8_BYTES if bytes([b]) not in ranks]
    if lost:
        raise ValueError(
            f"{where}: single-byte token 0x{lost[0]:02x} missing ({len(lost)} missing)"
        )


def _token_name(value: Any, field: str, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: {field} must be a string or an object with 'content'")


class KimiTokenizer:
    """Kimi tiktoken tokenizer: ``num_base_tokens`` BPE ranks followed by 256 special ids.

    ``bos_id``/``eos_id``/``pad_id``/``unk_id`` are the ids of those roles (None when unset)."""

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        added_tokens: Mapping[int, tuple[str, bool]] | None = None,
        *,
        bos_token: str | None = "[BOS]",
        eos_token: str | None = "[EOS]",
        pad_token: str | None = None,
        unk_token: str | None = None,
        additional_special_tokens: Iterable[str] = (),
        name: str = "kimi",
        source: str = "<tokenizer>",
    ) -> None:
        """``added_tokens`` maps special id -> (content, HF ``special`` flag); ``source`` names the
        file that errors are reported against."""
        _check_ranks(mergeable_ranks, source)
        nb = self.num_base_tokens = len(mergeable_ranks)
        end = nb + NUM_RESERVED_SPECIAL_TOKENS
        added = dict(added_tokens or {})
        special: dict[str, int] = {}
        reserved = set()  # unnamed slots: never text, so skip_special_tokens drops them too
        for tid in range(nb, end):
            if tid not in added:
                reserved.add(tid)
            tok_name = added.pop(tid, (f"<|reserved_token_{tid}|>", False))[0]
            if tok_name in special:
                raise ValueError(f"{source}: duplicate special token name {tok_name!r} ({tid})")
            special[tok_name] = tid
        if added:
            tid, (content, _) = min(added.items())
            raise ValueError(
                f"{source}: added token id {tid} ({content!r}) is outside the special-token "
                f"range [{nb}, {end}) of a {nb}-token vocabulary"
            )
        roles = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        roles["unk_token"] = unk_token
        extra = list(additional_special_tokens)
        for field, tok in [*roles.items(), *(("additional_special_tokens", t) for t in extra)]:
            if tok is not None and tok not in special:
                raise ValueError(f"{source}: {field} {tok!r} is not a defined special token")
        ids = {f: None if t is None else special[t] for f, t in roles.items()}
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.pad_id, self.unk_id = ids["pad_token"], ids["unk_token"]
        skip = {tid for tid, (_, flag) in (added_tokens or {}).items() if flag}
        skip.update(i for i in ids.values() if i is not None)
        skip.update(special[t] for t in extra)
        skip.update(reserved)
        self._skip_ids = frozenset(skip)
        self._special = special
        self._enc = tiktoken.Encoding(
            name=name,
            pat_str=PAT_STR,
            mergeable_ranks=dict(mergeable_ranks),
            special_tokens=special,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> KimiTokenizer:
        """Load ``tiktoken.model`` and ``tokenizer_config.json`` from a checkpoint directory."""
        path = Path(path)
        ranks = load_tiktoken_ranks(path / VOCAB_FILE)
        cfg_path = path / CONFIG_FILE
        src = str(cfg_path)
        if not cfg_path.is_file():
            raise ValueError(f"{src}: tokenizer config file not found")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{src}: invalid JSON: {exc}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{src}: top level must be a JSON object")
        raw = cfg.get("added_tokens_decoder") or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{src}: added_tokens_decoder must be an object")
        added: dict[int, tuple[str, bool]] = {}
        for key, entry in raw.items():
            if not re.fullmatch(r"[0-9]+", key):
                raise ValueError(f"{src}: added_tokens_decoder key {key!r} is not a token id")
            content = _token_name(entry, f"added_tokens_decoder[{key}]", src)
            flag = entry.get("special", False) if isinstance(entry, dict) else False
            if not content or not isinstance(flag, bool):
                raise ValueError(f"{src}: added_tokens_decoder[{key}] needs content, bool special")
            added[int(key)] = (content, flag)
        defaults = {
            "bos_token": "[BOS]",
            "eos_token": "[EOS]",
            "pad_token": None,
            "unk_token": None,
        }
        roles = {f: _token_name(cfg.get(f, d), f, src) for f, d in defaults.items()}
        extra = cfg.get("additional_special_tokens") or []
        if not isinstance(extra, list):
            raise ValueError(f"{src}: additional_special_tokens must be a list")
        extra = [_token_name(t, "additional_special_tokens", src) or "" for t in extra]
        name = path.resolve().name
        return cls(ranks, added, **roles, additional_special_tokens=extra, name=name, source=src)

    @property
    def vocab_size(self) -> int:
        return self.num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS

    @property
    def im_end_id(self) -> int | None:
        return self._special.get("<|im_end|>")

    @property
    def special_tokens(self) -> dict[str, int]:
        """All 256 special names (reserved slots included) -> id; a fresh copy."""
        return dict(self._special)

    @property
    def skipped_special_ids(self) -> frozenset[int]:
        """Ids removed by ``skip_special_tokens=True``: tokens flagged "special", the
        bos/eos/pad/unk roles, additional_special_tokens and the unnamed reserved slots."""
        return self._skip_ids

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying ``tiktoken.Encoding`` (read-only use)."""
        return self._enc

    def token_id(self, name: str) -> int | None:
        """Id of the special token called ``name``, or None."""
        return self._special.get(name)

    def is_special(self, token_id: int) -> bool:
        """True for ids in the 256-slot special range (named or reserved)."""
        return self.num_base_tokens <= token_id < self.vocab_size

    # ---- encode / decode --------------------------------------------------------------------
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Encode ``text``. Special-token strings inside it are plain text unless
        ``allow_special`` (use only for trusted, template-rendered prompts). Long inputs are split
        like Kimi's tokenizer: 400k-char chunks, then runs > 25k (non-)whitespace chars."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        enc = self._enc
        out: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS]):
                if allow_special:
                    out.extend(enc.encode(piece, allowed_special="all"))
                else:
                    out.extend(enc.encode_ordinary(piece))
        return out

    def _checked(self, ids: Iterable[int]) -> list[int]:
        out = [operator.index(i) for i in ids]
        n = self.vocab_size
        if out and (min(out) < 0 or max(out) >= n):
            bad = next(i for i in out if not 0 <= i < n)
            raise ValueError(f"token id {bad} out of range [0, {n})")
        return out

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Decode ids to text; invalid UTF-8 becomes U+FFFD. Raises ValueError on a bad id."""
        checked = self._checked(ids)
        if skip_special_tokens:
            checked = [i for i in checked if i not in self._skip_ids]
        return self._enc.decode_bytes(checked).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (special tokens: the UTF-8 of their name)."""
        token_id = operator.index(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return self._enc.decode_single_token_bytes(token_id)


class IncrementalDetokenizer:
    """Streaming decode, O(1) per token: ``"".join(push(t) for t in ids) + flush()`` always
    equals ``tokenizer.decode(ids, skip_special_tokens=...)``. Bytes of an incomplete UTF-8
    character are held back until it completes; invalid bytes come out as U+FFFD."""

    def __init__(self, tokenizer: KimiTokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = tokenizer.skipped_special_ids if skip_special_tokens else frozenset()
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token; return the text it completes (possibly empty)."""
        data = self._tok.token_bytes(token_id)
        if token_id in self._skip:
            return ""
        return self._dec.decode(data)

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join([self.push(i) for i in ids])

    def flush(self) -> str:
        """End of stream: emit held-back bytes (an incomplete character becomes U+FFFD)."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
