"""Exact-string tests for kimi_grpc/assets/chat_template.jinja (Kimi K2.6 format, spec 4.1/4.4)."""

from __future__ import annotations

from typing import Any

import jinja2
import pytest

from kimi_grpc.chat import BUNDLED_TEMPLATE_PATH as TEMPLATE_PATH
from kimi_grpc.chat import make_jinja_environment
from kimi_grpc.tokenizer import KimiTokenizer, demo_tokenizer_dir

GEN = "<|im_assistant|>assistant<|im_middle|>"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "查询天气",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOLS_JSON = (
    '[{"type":"function","function":{"name":"get_weather","description":"查询天气",'
    '"parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]'
)


@pytest.fixture(scope="module")
def template() -> jinja2.Template:
    # The one transformers-compatible environment, shared with the server's ChatRenderer.
    return make_jinja_environment().from_string(TEMPLATE_PATH.read_text(encoding="utf-8"))


def call(idx: int, name: str, args: Any) -> dict[str, Any]:
    return {
        "id": f"functions.{name}:{idx}",
        "type": "function",
        "function": {"name": name, "arguments": args},
    }


def turn(tag: str, name: str, body: str) -> str:
    return f"<|im_{tag}|>{name}<|im_middle|>{body}<|im_end|>"


SYSTEM_USER = [
    {"role": "system", "content": "You are Kimi."},
    {"role": "user", "content": "What is 2+2?"},
]
PREFIX = turn("system", "system", "You are Kimi.") + turn("user", "user", "What is 2+2?")


def test_system_user_generation_prompt_thinking_on(template: jinja2.Template) -> None:
    want = PREFIX + GEN + "<think>"
    assert template.render(messages=SYSTEM_USER, add_generation_prompt=True) == want
    assert template.render(messages=SYSTEM_USER, add_generation_prompt=True, thinking=True) == want


def test_system_user_generation_prompt_thinking_off(template: jinja2.Template) -> None:
    out = template.render(messages=SYSTEM_USER, add_generation_prompt=True, thinking=False)
    assert out == PREFIX + GEN + "<think></think>"
    assert template.render(messages=SYSTEM_USER, add_generation_prompt=False) == PREFIX
    assert template.render(messages=SYSTEM_USER) == PREFIX


def test_tool_call_loop_exact(template: jinja2.Template) -> None:
    messages = [
        {"role": "user", "content": "Weather in Beijing and Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Need two lookups.",
            "tool_calls": [
                call(0, "get_weather", {"city": "北京", "unit": "c"}),
                call(1, "get_weather", '{"city":"Paris"}'),
            ],
        },
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "晴 25°C"},
        {
            "role": "tool",
            "name": "get_weather",
            "tool_call_id": "functions.get_weather:1",
            "content": [{"type": "text", "text": "rain 14°C"}],
        },
    ]
    out = template.render(messages=messages, tools=TOOLS, add_generation_prompt=True)
    assert out == (
        "<|im_system|>tool_declare<|im_middle|>" + TOOLS_JSON + "<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Beijing and Paris?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>Need two lookups.</think>Checking."
        "<|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "北京", "unit": "c"}<|tool_call_end|>'
        "<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>"
        '{"city":"Paris"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n晴 25°C<|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:1\n"
        "rain 14°C<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>"
    )
    ts = "# Tools\n\n## functions\nnamespace functions {\n}\n"
    with_ts = template.render(messages=messages, tools=TOOLS, tools_ts_str=ts)
    assert with_ts.startswith(
        "<|im_system|>tool_declare<|im_middle|>" + ts + "<|im_end|><|im_user|>"
    )
    assert "tool_declare" not in template.render(messages=messages, tools=[])


HISTORY = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
    {"role": "user", "content": "q2"},
    {
        "role": "assistant",
        "content": "",
        "reasoning": "r2",
        "tool_calls": [call(0, "search", {"q": "x"})],
    },
    {"role": "tool", "tool_call_id": "functions.search:0", "content": "found"},
]


def expected_history(r1: str, r2: str, gen: str) -> str:
    return (
        turn("user", "user", "q1")
        + turn("assistant", "assistant", f"<think>{r1}</think>a1")
        + turn("user", "user", "q2")
        + turn(
            "assistant",
            "assistant",
            f"<think>{r2}</think><|tool_calls_section_begin|><|tool_call_begin|>functions.search:0"
            '<|tool_call_argument_begin|>{"q": "x"}<|tool_call_end|><|tool_calls_section_end|>',
        )
        + turn("system", "tool", "## Return of functions.search:0\nfound")
        + GEN
        + gen
    )


@pytest.mark.parametrize(
    ("kwargs", "r1", "r2", "gen"),
    [
        ({}, "", "r2", "<think>"),
        ({"preserve_thinking": False}, "", "r2", "<think>"),
        ({"preserve_thinking": True}, "r1", "r2", "<think>"),
        ({"thinking": False}, "", "", "<think></think>"),
        ({"thinking": False, "preserve_thinking": True}, "r1", "r2", "<think></think>"),
    ],
)
def test_history_reasoning_dropped_or_kept(
    template: jinja2.Template, kwargs: dict[str, bool], r1: str, r2: str, gen: str
) -> None:
    out = template.render(messages=HISTORY, add_generation_prompt=True, **kwargs)
    assert out == expected_history(r1, r2, gen)


def test_final_assistant_answer_is_history(template: jinja2.Template) -> None:
    messages = [*HISTORY, {"role": "assistant", "content": "done", "reasoning_content": "r3"}]
    out = template.render(messages=messages)
    assert out.endswith(turn("assistant", "assistant", "<think></think>done"))
    assert "r2" not in out and "r3" not in out  # everything up to the last plain answer
    kept = template.render(messages=messages, preserve_thinking=True)
    assert kept.endswith(turn("assistant", "assistant", "<think>r3</think>done"))


def test_null_reasoning_never_renders_none(template: jinja2.Template) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": None,
            "reasoning": None,
            "tool_calls": [call(0, "f", {})],
        },
        {"role": "tool", "tool_call_id": "functions.f:0", "content": "ok"},
        {"role": "assistant", "content": "x", "reasoning": None, "reasoning_content": "rc"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "y", "tool_calls": [call(1, "f", "{}")]},
    ]
    out = template.render(messages=messages, preserve_thinking=True, add_generation_prompt=True)
    assert "None" not in out
    assert out == (
        turn("user", "user", "hi")
        + turn(
            "assistant",
            "assistant",
            "<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
            "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
        )
        + turn("system", "tool", "## Return of functions.f:0\nok")
        + turn("assistant", "assistant", "<think>rc</think>x")
        + turn("user", "user", "again")
        + turn(
            "assistant",
            "assistant",
            "<think></think>y<|tool_calls_section_begin|><|tool_call_begin|>functions.f:1"
            "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>",
        )
        + GEN
        + "<think>"
    )


def test_content_parts_names_and_media(template: jinja2.Template) -> None:
    messages = [
        {"role": "system", "content": None},
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "look "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "at this"},
                {"type": "image", "image": "pixels"},
            ],
        },
        {"role": "user", "content": []},
    ]
    media = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\n"
    assert template.render(messages=messages) == (
        turn("system", "system", "")
        + turn("user", "alice", "look " + media + "at this" + media)
        + turn("user", "user", "")
    )


def test_rendered_prompt_tokenizes_with_special_ids(template: jinja2.Template) -> None:
    tok = KimiTokenizer.from_dir(demo_tokenizer_dir())
    prompt = template.render(messages=HISTORY, tools=TOOLS, add_generation_prompt=True)
    ids = tok.encode(prompt, allow_special=True)
    assert tok.decode(ids) == prompt
    names = {v: k for k, v in tok.special_tokens.items()}
    assert [names[i] for i in ids if tok.is_special(i)] == [
        "<|im_system|>", "<|im_middle|>", "<|im_end|>",
        "<|im_user|>", "<|im_middle|>", "<|im_end|>",
        "<|im_assistant|>", "<|im_middle|>", "<think>", "</think>", "<|im_end|>",
        "<|im_user|>", "<|im_middle|>", "<|im_end|>",
        "<|im_assistant|>", "<|im_middle|>", "<think>", "</think>",
        "<|tool_calls_section_begin|>", "<|tool_call_begin|>", "<|tool_call_argument_begin|>",
        "<|tool_call_end|>", "<|tool_calls_section_end|>", "<|im_end|>",
        "<|im_system|>", "<|im_middle|>", "<|im_end|>",
        "<|im_assistant|>", "<|im_middle|>", "<think>",
    ]  # fmt: skip
    # Without allow_special the same text contains no special ids at all.
    assert not any(tok.is_special(i) for i in tok.encode(prompt))
