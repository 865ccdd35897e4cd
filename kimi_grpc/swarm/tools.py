"""Tools for swarm sub-agents: Python callables or local commands, with JSON-schema parameters.

A tool call never raises into the swarm: unknown tools, arguments that are not a JSON object,
exceptions, non-zero exits and timeouts all come back as an ``"error: ..."`` *result* that the
model reads on its next step.

A tools file (``kimi-grpc swarm --tools FILE``) is either a Python module defining ``TOOLS`` (a
list of :class:`Tool` objects or plain functions) or a JSON list of command tools
``{"name", "description", "parameters", "command": [argv...]}`` (arguments arrive on stdin).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 60.0
MAX_RESULT_CHARS = 64_000  # a tool result longer than this is cut (and says so)
_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}
_JSON_TYPES.update({list: "array", dict: "object"})


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})
    function: Callable[..., Any] | None = None  # called with the arguments as keywords
    command: tuple[str, ...] | None = None  # argv; the arguments JSON on stdin
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if (self.function is None) == (self.command is None):
            raise ValueError(f"tool {self.name!r}: give exactly one of function or command")

    @classmethod
    def from_function(cls, fn: Callable[..., Any], **overrides: Any) -> Tool:
        """Name, description (first docstring line) and a parameter schema from the signature:
        annotated int/float/bool/str/list/dict map to JSON types; parameters without a default
        are required."""
        props: dict[str, Any] = {}
        required = []
        try:  # resolves string annotations (from __future__ import annotations)
            signature = inspect.signature(fn, eval_str=True)
        except (NameError, TypeError):
            signature = inspect.signature(fn)
        for param in signature.parameters.values():
            kind = _JSON_TYPES.get(param.annotation)
            props[param.name] = {"type": kind} if kind else {}
            if param.default is inspect.Parameter.empty:
                required.append(param.name)
        schema: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            schema["required"] = required
        doc = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        fields = {"name": fn.__name__, "description": doc, "parameters": schema, "function": fn}
        return cls(**{**fields, **overrides})

    def declaration(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            tool = tool if isinstance(tool, Tool) else Tool.from_function(tool)
            if tool.name in self.tools:
                raise ValueError(f"tool {tool.name!r} is declared twice")
            self.tools[tool.name] = tool

    @classmethod
    def from_file(cls, path: str | Path) -> ToolRegistry:
        path = Path(path)
        if path.suffix == ".json":
            entries = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(entries, list):
                raise ValueError(f"{path}: expected a JSON list of tools")
            return cls(
                Tool(
                    name=e["name"],
                    description=e.get("description", ""),
                    parameters=e.get("parameters") or {"type": "object"},
                    command=tuple(e["command"]),
                    timeout_s=float(e.get("timeout_s", DEFAULT_TIMEOUT_S)),
                )
                for e in entries
            )
        spec = importlib.util.spec_from_file_location(f"kimi_swarm_tools_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ValueError(f"{path}: not a Python file or a JSON list of tools")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # the user's own local file
        tools = getattr(module, "TOOLS", None)
        if not isinstance(tools, list | tuple):
            raise ValueError(f"{path}: define TOOLS = [...] (Tool objects or functions)")
        return cls(tools)

    def declarations(self) -> list[dict[str, Any]]:
        return [tool.declaration() for tool in self.tools.values()]

    async def call(self, name: str, arguments: str) -> str:
        tool = self.tools.get(name)
        if tool is None:
            return f"error: unknown tool {name!r}; available: {sorted(self.tools)}"
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return f"error: arguments are not valid JSON ({exc})"
        if not isinstance(args, dict):
            return "error: arguments must be a JSON object"
        try:
            if tool.command is not None:
                result = await _run_command(tool, arguments)
            else:
                result = await asyncio.wait_for(_run_function(tool.function, args), tool.timeout_s)
        except TimeoutError:
            return f"error: {name} timed out after {tool.timeout_s:g} s"
        except Exception as exc:  # the tool's failure is the model's information
            return f"error: {name} raised {type(exc).__name__}: {exc}"
        if not isinstance(result, str):
            result = json.dumps(result, ensure_ascii=False, default=str)
        if len(result) > MAX_RESULT_CHARS:
            result = result[:MAX_RESULT_CHARS] + f"\n[cut at {MAX_RESULT_CHARS} characters]"
        return result


async def _run_function(fn: Callable[..., Any], args: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(**args)
    return await asyncio.to_thread(fn, **args)


async def _run_command(tool: Tool, arguments: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *tool.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return f"error: {tool.name} could not start: {exc}"
    try:
        out, err = await asyncio.wait_for(proc.communicate(arguments.encode()), tool.timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip()[-2000:]
        return f"error: {tool.name} exited with {proc.returncode}: {tail}"
    return out.decode(errors="replace")
