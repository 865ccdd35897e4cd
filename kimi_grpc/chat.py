"""Chat prompts for Kimi K2.6: validate OpenAI-style messages, render the checkpoint's chat
template, and tokenize the result so client text can never become special tokens.

Pipeline of :meth:`ChatRenderer.render` (docs/kimi-spec.md 3.1, 4.1, 4.4):

1. Validate ``messages`` / ``tools`` / ``template_kwargs``; every problem is a :class:`ChatError`
   whose ``field`` is a path such as ``messages[2].tool_call_id``.
2. Normalise like Kimi's tokenizer and API: copy only the known message keys, drop null
   ``reasoning_content``/``reasoning`` (templates would print "None"), deep-sort the tools' keys
   (``deep_sort_dict``), build ``tools_ts_str``, and rename every history tool-call id to
   ``functions.{name}:{k}`` (k = position among all calls in the conversation) because K2.x
   imitates the ids it sees and was trained on this form only.
3. Shield: every special-token string inside client data (``<|im_end|>``, ``<think>``, ...) is
   replaced by a per-render random ASCII sentinel, so after rendering, special-token strings can
   only come from the template's own markup.
4. Render in a transformers-compatible Jinja sandbox; replace each video placeholder the
   template emitted by that video's timestamped chunk prompt (``video_prompts``; the client's own
   text can never hold a placeholder, the shield hides it too); split the output on special-token
   strings (-> special ids) and encode each text segment, sentinels restored, as ordinary text.
   The returned ``text`` is the prompt with the client's strings exactly as given.

Content is a string or a list of parts: ``{"type": "text", "text": ...}``, and in user messages
``{"type": "image" | "image_url"}`` / ``{"type": "video" | "video_url"}`` (any other keys, such
as the media bytes, are the caller's: they never reach the template). The template renders an
image as ``<|media_begin|>image<|media_content|><|media_pad|><|media_end|>`` and a video as the
checkpoint's placeholder; :attr:`RenderedChat.media` lists the media parts in prompt order.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kimi_grpc.config import DEFAULT_VIDEO_PLACEHOLDER
from kimi_grpc.tokenizer import KimiTokenizer
from kimi_grpc.tool_declaration_ts import (
    ToolDeclarationError,
    child_path,
    encode_tools_to_typescript_style,
)

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
BUNDLED_TEMPLATE_PATH = Path(__file__).resolve().parent / "assets" / TEMPLATE_FILE
ROLES = frozenset({"system", "user", "assistant", "tool"})
TOOL_NAME_RE = re.compile(r"[A-Za-z_][\w.\-]*")
# Variables the renderer sets itself; chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARS = frozenset(
    {"messages", "tools", "tools_ts_str", "add_generation_prompt", "thinking", "preserve_thinking"}
    | {"raise_exception", "strftime_now", "dict", "namespace"}
)
MAX_JSON_DEPTH = 64  # nesting limit for arguments / tool schemas / kwargs (no RecursionError)
MEDIA_PART_TYPES = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}


class ChatError(ValueError):
    """Bad messages/tools; .field names the offending field, e.g. 'messages[2].tool_call_id'."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class RenderedChat:
    """A rendered prompt; ``tokenizer.decode(token_ids) == text`` always holds.

    text: the rendered prompt, client strings exactly as given.
    token_ids: the prompt tokens (template markup -> special ids; client text never special).
    tool_call_ids: original history tool-call id -> normalised ``functions.NAME:N`` id.
    num_tool_calls: tool calls in the history, i.e. the conversation index of the next one.
    media: the image / video parts in prompt order (each image's ``<|media_pad|>`` and each
    video's chunk pads appear in ``token_ids`` in this order)."""

    text: str
    token_ids: list[int]
    tool_call_ids: dict[str, str]
    num_tool_calls: int = 0
    media: tuple[MediaRef, ...] = ()


@dataclass(frozen=True)
class MediaRef:
    """Where one media part sits in the request: ``messages[message_index].content[part_index]``
    (the caller's field name may differ), and whether it is an image or a video."""

    message_index: int
    part_index: int
    kind: str  # "image" | "video"


# ---- transformers-compatible Jinja environment -------------------------------------------------


def tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' chat-template ``tojson``: plain ``json.dumps`` (no HTML escaping)."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def raise_exception(message: str) -> None:
    """Templates call this to reject their input."""
    raise TemplateError(message)


def strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # self in args: allows namespace(self=…)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} may not start with '_'")


class _TemplateDict:
    """The ``dict`` global: builds dicts without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but touching an unsafe attribute (``''.__class__``, ``x.append``)
    fails at once instead of yielding an Undefined that renders as an empty string."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object")


def make_jinja_environment() -> ImmutableSandboxedEnvironment:
    """The environment chat templates are compiled in (transformers' settings)."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=strftime_now,
        dict=_TemplateDict(),
        namespace=_Namespace,
    )
    return env


# ---- validation / normalisation ----------------------------------------------------------------


def _json_copy(value: Any, path: str, *, sort_keys: bool, depth: int = 0) -> Any:
    """A plain-JSON copy of ``value`` (tuples become lists), keys sorted recursively when
    ``sort_keys`` (Kimi's ``deep_sort_dict``; list order is kept)."""
    if depth > MAX_JSON_DEPTH:
        raise ChatError(path, f"nested deeper than {MAX_JSON_DEPTH} levels")
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, Mapping):
        items = list(value.items())
        bad = next((k for k, _ in items if not isinstance(k, str)), None)
        if bad is not None:
            raise ChatError(path, f"object key {bad!r} is not a string")
        if sort_keys:
            items.sort(key=lambda kv: kv[0])
        sub = [(k, v, child_path(path, k)) for k, v in items]
        return {k: _json_copy(v, p, sort_keys=sort_keys, depth=depth + 1) for k, v, p in sub}
    if isinstance(value, list | tuple):
        sub = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        return [_json_copy(v, p, sort_keys=sort_keys, depth=depth + 1) for p, v in sub]
    raise ChatError(path, f"{type(value).__name__} is not a JSON value")


def _opt_str(msg: Mapping[str, Any], key: str, path: str) -> str | None:
    value = msg.get(key)
    if value is not None and not isinstance(value, str):
        raise ChatError(f"{path}.{key}", "must be a string or null")
    return value


def _check_name(name: Any, path: str) -> str:
    if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
        raise ChatError(path, f"invalid function name {name!r} (want [A-Za-z_][A-Za-z0-9_.-]*)")
    return name


@dataclass
class _Calls:
    """Tool-call renaming state while walking the conversation."""

    count: int = 0
    latest: dict[str, str] = field(default_factory=dict)  # original id -> newest renamed id

    def rename(self, call: Any, path: str) -> dict[str, Any]:
        if not isinstance(call, Mapping):
            raise ChatError(path, "must be an object")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise ChatError(f"{path}.id", "must be a non-empty string")
        if call.get("type", "function") != "function":
            raise ChatError(f"{path}.type", "must be 'function'")
        fn = call.get("function")
        if not isinstance(fn, Mapping):
            raise ChatError(f"{path}.function", "must be an object")
        name = _check_name(fn.get("name"), f"{path}.function.name")
        args = fn.get("arguments")
        where = f"{path}.function.arguments"
        if isinstance(args, Mapping):
            args = _json_copy(args, where, sort_keys=False)
        elif not isinstance(args, str):
            raise ChatError(where, "must be a JSON string or an object")
        new_id = f"functions.{name}:{self.count}"
        self.count += 1
        self.latest[call_id] = new_id
        return {"id": new_id, "type": "function", "function": {"name": name, "arguments": args}}


def _content(
    value: Any, role: str, path: str, message_index: int, media: list[MediaRef]
) -> str | list[dict[str, str]] | None:
    """A message's content: a string, null, or a list of parts (copied as ``{"type": "text",
    "text"}`` / ``{"type": "image"}`` / ``{"type": "video"}``; media only in user messages, each
    appended to ``media``)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list | tuple):
        raise ChatError(path, "must be a string, null or a list of content parts")
    parts: list[dict[str, str]] = []
    for j, part in enumerate(value):
        where = f"{path}[{j}]"
        if not isinstance(part, Mapping):
            raise ChatError(where, "must be an object")
        kind = part.get("type")
        if not isinstance(kind, str):
            raise ChatError(f"{where}.type", f"must be a string, got {kind!r}")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ChatError(f"{where}.text", "must be a string")
            parts.append({"type": "text", "text": text})
        elif kind in MEDIA_PART_TYPES:
            if role != "user":
                raise ChatError(where, f"{kind} parts are only allowed in user messages")
            media.append(MediaRef(message_index, j, MEDIA_PART_TYPES[kind]))
            parts.append({"type": MEDIA_PART_TYPES[kind]})
        else:
            want = ", ".join(["text", *MEDIA_PART_TYPES])
            raise ChatError(f"{where}.type", f"must be one of {want}, got {kind!r}")
    return parts


def _normalise_messages(
    messages: Any,
) -> tuple[list[dict[str, Any]], dict[str, str], int, tuple[MediaRef, ...]]:
    """Validated copies of the messages with renamed tool-call ids; plus the id map, the
    number of tool calls and the media parts. Only known keys are copied, so nothing else
    reaches the template."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ChatError("messages", "must be a non-empty list")
    media: list[MediaRef] = []
    calls = _Calls()
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise ChatError(path, "must be an object")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ChatError(f"{path}.role", f"must be one of {sorted(ROLES)}, got {role!r}")
        content = _content(msg.get("content"), role, f"{path}.content", i, media)
        name = _opt_str(msg, "name", path)
        reasoning = {k: _opt_str(msg, k, path) for k in ("reasoning_content", "reasoning")}
        norm: dict[str, Any] = {"role": role, "content": content or ""}
        if name is not None:
            norm["name"] = name
        raw_calls = msg.get("tool_calls")
        if raw_calls is not None:
            if role != "assistant":
                raise ChatError(f"{path}.tool_calls", "only assistant messages have tool calls")
            if not isinstance(raw_calls, list | tuple):
                raise ChatError(f"{path}.tool_calls", "must be a list")
            renamed = [calls.rename(c, f"{path}.tool_calls[{j}]") for j, c in enumerate(raw_calls)]
            if renamed:
                norm["tool_calls"] = renamed
        if content is None and "tool_calls" not in norm:
            why = "is required (null only for an assistant message with tool_calls)"
            raise ChatError(f"{path}.content", why)
        if role == "assistant":
            norm.update({k: v for k, v in reasoning.items() if v is not None})
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in calls.latest:
                why = f"{call_id!r} does not match a tool call of an earlier assistant message"
                raise ChatError(f"{path}.tool_call_id", why)
            norm["tool_call_id"] = calls.latest[call_id]
        out.append(norm)
    # Every original id maps to its LAST renaming (a repeated id is answered by the newest call).
    return out, dict(calls.latest), calls.count, tuple(media)


def _normalise_tools(tools: Any) -> list[dict[str, Any]]:
    """Validated, deep-key-sorted copies of the tool declarations ([] when none)."""
    if tools is None:
        return []
    if not isinstance(tools, list | tuple):
        raise ChatError("tools", "must be a list")
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        path = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise ChatError(path, "must be an object")
        if tool.get("type") != "function":
            raise ChatError(f"{path}.type", "must be 'function'")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise ChatError(f"{path}.function", "must be an object")
        name = _check_name(fn.get("name"), f"{path}.function.name")
        if name in seen:
            raise ChatError(f"{path}.function.name", f"duplicate of tools[{seen[name]}]")
        seen[name] = i
        _opt_str(fn, "description", f"{path}.function")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise ChatError(f"{path}.function.parameters", "must be a JSON schema object")
    return [_json_copy(t, f"tools[{i}]", sort_keys=True) for i, t in enumerate(tools)]


def _normalise_kwargs(kwargs: Any) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ChatError("chat_template_kwargs", "must be an object")
    out = {}
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise ChatError("chat_template_kwargs", f"key {key!r} is not a string")
        where = f"chat_template_kwargs.{key}"
        if key in RESERVED_TEMPLATE_VARS:
            raise ChatError(where, "is set by the server and cannot be overridden")
        out[key] = _json_copy(value, where, sort_keys=False)
    return out


# ---- special-token shield ----------------------------------------------------------------------


def _trie_regex(words: list[str]) -> str:
    """A regex matching any of ``words``, longest match first, built as a character trie: 256
    special names as a flat alternation cost ~15x more per scanned character."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}  # end-of-word marker

    def build(node: dict[str, Any]) -> str:
        alts = [re.escape(ch) + build(sub) for ch, sub in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer word wins

    return build(trie)


class _Shield:
    """Per-render replacement of special-token strings in client data by sentinels
    ``KIMISPECIAL<32 random hex>_<index>_`` (ASCII, so they survive ``tojson`` even with
    ensure_ascii) and back. Clients cannot forge a sentinel: the nonce is new every render."""

    def __init__(self, special_re: re.Pattern[str], names: list[str], index: dict[str, int]):
        self._special_re = special_re
        self._names = names  # index -> special-token name
        self._index = index  # special-token name -> index
        self.nonce = secrets.token_hex(16)
        self._sentinel_re = re.compile(f"KIMISPECIAL{self.nonce}_([0-9]+)_")

    def hide(self, text: str) -> str:
        nonce = self.nonce
        return self._special_re.sub(lambda m: f"KIMISPECIAL{nonce}_{self._index[m[0]]}_", text)

    def hide_json(self, value: Any) -> Any:
        """Copy of JSON data with every string (keys included) shielded; key order kept."""
        if isinstance(value, str):
            return self.hide(value)
        if isinstance(value, dict):
            return {self.hide(k): self.hide_json(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.hide_json(v) for v in value]
        return value

    def restore(self, text: str) -> str:
        if self.nonce not in text:
            return text
        return self._sentinel_re.sub(lambda m: self._names[int(m[1])], text)


# ---- renderer -----------------------------------------------------------------------------------


class ChatRenderer:
    """Renders chats with one compiled chat template for one tokenizer. Thread-safe: render()
    keeps no state between calls."""

    def __init__(
        self,
        template_source: str,
        tokenizer: KimiTokenizer,
        *,
        video_placeholder: str = DEFAULT_VIDEO_PLACEHOLDER,
    ) -> None:
        """``video_placeholder``: the text the template emits for a video part (the checkpoint's
        ``video_placeholder``); shielded in client text like a special token."""
        if not isinstance(template_source, str):
            raise ChatError("chat_template", "must be a string")
        try:
            self._template = make_jinja_environment().from_string(template_source)
        except Exception as exc:  # TemplateSyntaxError, or e.g. RecursionError on absurd nesting
            raise ChatError("chat_template", f"invalid template: {exc}") from exc
        self._tok = tokenizer
        self._special_ids = tokenizer.special_tokens
        self._special_re = re.compile(_trie_regex(sorted(self._special_ids)))
        # What client text may not spell: the special tokens and the video placeholder.
        self.video_placeholder = video_placeholder
        self._names = sorted(set(self._special_ids) | {video_placeholder})
        self._index = {name: i for i, name in enumerate(self._names)}
        self._shielded_re = re.compile(_trie_regex(self._names))

    @classmethod
    def from_model_dir(
        cls,
        path: str | Path,
        tokenizer: KimiTokenizer,
        *,
        video_placeholder: str = DEFAULT_VIDEO_PLACEHOLDER,
    ) -> ChatRenderer:
        """Template from ``chat_template.jinja`` in ``path``, else ``tokenizer_config.json``'s
        ``chat_template`` (a string, or a list of {"name", "template"}: the "default" one)."""
        path = Path(path)
        try:
            if (path / TEMPLATE_FILE).is_file():
                source = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
                return cls(source, tokenizer, video_placeholder=video_placeholder)
            cfg_path = path / TOKENIZER_CONFIG_FILE
            if not cfg_path.is_file():
                raise ChatError("chat_template", f"{path}: no {TEMPLATE_FILE} or {cfg_path.name}")
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ChatError("chat_template", f"{path}: cannot read the template: {exc}") from exc
        source = cfg.get("chat_template") if isinstance(cfg, dict) else None
        if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str):
            why = "has no chat_template string (or list entry named 'default')"
            raise ChatError("chat_template", f"{cfg_path} {why}")
        return cls(source, tokenizer, video_placeholder=video_placeholder)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        thinking: bool = True,
        preserve_thinking: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        video_prompts: Sequence[str] = (),
    ) -> RenderedChat:
        """Validate, normalise, render and tokenize one chat (see the module docstring).

        ``video_prompts``: one per video part, in order (``media.request.video_prompts``), each
        replacing that video's placeholder before tokenization, as Moonshot's processor does."""
        flags = {
            "add_generation_prompt": add_generation_prompt,
            "thinking": thinking,
            "preserve_thinking": preserve_thinking,
        }
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise ChatError(name, "must be a boolean")
        msgs, id_map, num_calls, media = _normalise_messages(messages)
        videos = sum(1 for ref in media if ref.kind == "video")
        if len(video_prompts) != videos:
            raise ChatError("messages", f"{videos} video parts but {len(video_prompts)} prompts")
        tool_list = _normalise_tools(tools)
        try:
            ts = encode_tools_to_typescript_style(tool_list)
        except ToolDeclarationError as exc:
            raise ChatError(exc.path, exc.reason) from None
        extra = _normalise_kwargs(template_kwargs)

        shield = _Shield(self._shielded_re, self._names, self._index)
        context = {
            **shield.hide_json(extra),
            **flags,
            "messages": shield.hide_json(msgs),
            "tools": shield.hide_json(tool_list) if tool_list else None,
            "tools_ts_str": shield.hide(ts) if ts else None,
        }
        try:  # any failure inside the template: sandbox, raise_exception, undefined, ...
            rendered = self._template.render(context)
        except Exception as exc:
            why = f"rendering failed: {type(exc).__name__}: {exc}"
            raise ChatError("chat_template", why) from exc
        if video_prompts:
            rendered = self._replace_video_placeholders(rendered, video_prompts)
        return self._tokenize(rendered, shield, id_map, num_calls, media)

    def _replace_video_placeholders(self, rendered: str, prompts: Sequence[str]) -> str:
        pieces = rendered.split(self.video_placeholder)
        if len(pieces) - 1 != len(prompts):
            raise ChatError(
                "chat_template",
                f"the template rendered {len(pieces) - 1} video placeholders for "
                f"{len(prompts)} video parts",
            )
        out = [pieces[0]]
        for prompt, rest in zip(prompts, pieces[1:], strict=True):
            out += [prompt, rest]
        return "".join(out)

    def _tokenize(
        self,
        rendered: str,
        shield: _Shield,
        id_map: dict[str, str],
        num_calls: int,
        media: tuple[MediaRef, ...],
    ) -> RenderedChat:
        """Special-token strings left in ``rendered`` are the template's: map them to ids; the
        text between them (client strings restored) is encoded with specials disallowed."""
        pieces: list[str] = []
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(rendered):
            self._add_text(shield.restore(rendered[pos : m.start()]), pieces, ids)
            pieces.append(m[0])
            ids.append(self._special_ids[m[0]])
            pos = m.end()
        self._add_text(shield.restore(rendered[pos:]), pieces, ids)
        text = "".join(pieces)
        if shield.nonce in text:
            raise ChatError("chat_template", "the template altered client text (broken sentinel)")
        return RenderedChat(text, ids, id_map, num_calls, media)

    def _add_text(self, segment: str, pieces: list[str], ids: list[int]) -> None:
        if segment:
            pieces.append(segment)
            ids.extend(self._tok.encode(segment, allow_special=False))
