"""A deterministic corpus of tool-call requests for testing guided (grammar-constrained) decoding.

Guided decoding must make every generated tool call name a declared tool and carry arguments
that validate against that tool's JSON schema. This module supplies realistic requests to test
that against, in the spirit of Moonshot's K2 Vendor Verifier: a library of sixty agent
tools (:data:`TOOLS`: files, shell, web, git/GitHub, calendar, email, databases, HTTP,
Kubernetes, payments, maps, weather, tickets, ...) and :func:`corpus`, which draws requests of 1
to 30 of those tools, each with a short chat and golden ``example_calls`` that are valid for
their tool's schema.

The schemas exercise what a grammar compiler has to handle: nested objects, enums, ``const``,
arrays of objects with ``minItems``/``maxItems``, number bounds (``exclusiveMinimum`` too),
string formats, lengths and patterns, local ``$defs``/``$ref``, ``anyOf``, closed and open
objects, empty parameter lists and ``strict: false`` declarations. They stay within what Kimi's
TypeScript tool-declaration encoder accepts (no ``oneOf``/``allOf``, every property typed) and
what llguidance compiles without ``lenient`` (no ``uniqueItems``). Example arguments list their
keys in schema order, because llguidance emits object properties in the order they are declared.

Everything is fixed data plus a SHA-256-seeded selection, so every run yields the same corpus.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["TOOLS", "CorpusCase", "corpus"]

CORPUS_SEED = "kimi-guided-corpus-v1"
CORPUS_SIZE = 240
# Tools per request, cycled over the cases: mostly small requests, some large, a few maximal.
TOOL_COUNT_CYCLE = (1, 2, 3, 4, 5, 1, 2, 3, 12, 4, 2, 30, 1, 5, 16, 3, 2, 20, 4, 10)
# Every HISTORY_PERIOD-th case replays an earlier call of its focus tool and that call's result.
HISTORY_PERIOD = 3
SYSTEM_PROMPTS = (
    None,
    "You are Kimi, an AI assistant created by Moonshot AI.",
    "You are a helpful assistant with access to tools. Call a tool whenever it helps.",
    "You are an autonomous operations agent. Prefer read-only tools before making changes.",
    "Answer concisely. Use only the functions provided; never invent tool names or arguments.",
)


@dataclass(frozen=True)
class CorpusCase:
    """One chat request: the declared ``tools`` (OpenAI style), the ``messages`` so far and
    ``(tool name, arguments)`` pairs that are valid calls of tools in ``tools``."""

    name: str
    tools: list[dict]
    messages: list[dict]
    example_calls: list[tuple[str, dict]]


@dataclass(frozen=True)
class _LibraryTool:
    """A tool declaration with a user request it serves, valid example arguments (the first is
    the call that request asks for) and a plausible result of that first call."""

    declaration: dict[str, Any]
    request: str
    examples: tuple[dict[str, Any], ...]
    result: str

    @property
    def name(self) -> str:
        return self.declaration["function"]["name"]


# ---- schema builders ---------------------------------------------------------------------------


def _typed(kind: str, description: str, keywords: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": kind}
    if description:
        schema["description"] = description
    return schema | keywords


def _string(description: str = "", **keywords: Any) -> dict[str, Any]:
    return _typed("string", description, keywords)


def _integer(description: str = "", **keywords: Any) -> dict[str, Any]:
    return _typed("integer", description, keywords)


def _number(description: str = "", **keywords: Any) -> dict[str, Any]:
    return _typed("number", description, keywords)


def _boolean(description: str = "", **keywords: Any) -> dict[str, Any]:
    return _typed("boolean", description, keywords)


def _enum(values: tuple[str, ...], description: str = "", **keywords: Any) -> dict[str, Any]:
    return _typed("string", description, {"enum": list(values)} | keywords)


def _array(items: dict[str, Any], description: str = "", **keywords: Any) -> dict[str, Any]:
    return _typed("array", description, {"items": items} | keywords)


def _nullable(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    """``schema`` or JSON null, as an ``anyOf``."""
    union: dict[str, Any] = {"anyOf": [schema, {"type": "null"}]}
    if description:
        union["description"] = description
    return union


def _ref(definition: str, description: str = "") -> dict[str, Any]:
    reference: dict[str, Any] = {"$ref": f"#/$defs/{definition}"}
    if description:
        reference["description"] = description
    return reference


def _object(
    properties: dict[str, Any],
    required: tuple[str, ...] = (),
    description: str = "",
    *,
    closed: bool = False,
    defs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An object schema; ``closed`` sets ``additionalProperties: false`` (otherwise it is left
    unspecified) and ``defs`` adds local ``$defs`` (only on a parameters object)."""
    schema = _typed("object", description, {"properties": properties})
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    if defs:
        schema["$defs"] = defs
    return schema


def _string_map(description: str) -> dict[str, Any]:
    """A free-form object whose values are strings (headers, labels, metadata)."""
    return _typed("object", description, {"additionalProperties": {"type": "string"}})


_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def _tool(
    name: str,
    description: str,
    parameters: dict[str, Any],
    *,
    request: str,
    examples: tuple[dict[str, Any], ...],
    result: str,
    strict: bool | None = None,
) -> _LibraryTool:
    function = {"name": name, "description": description, "parameters": parameters}
    if strict is not None:
        function["strict"] = strict
    declaration = {"type": "function", "function": function}
    return _LibraryTool(declaration, request, examples, result)


# ---- shared schema pieces ----------------------------------------------------------------------

_PATH = _string("Absolute or workspace-relative path", minLength=1, maxLength=4096)
_GITHUB_OWNER = _string("Repository owner (user or organisation)", pattern=r"^[A-Za-z0-9-]{1,39}$")
_GITHUB_REPO = _string("Repository name", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
_K8S_NAME = _string("A DNS-1123 label", maxLength=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CURRENCY = _string("ISO 4217 currency code, lower case", pattern=r"^[a-z]{3}$")
_LAT_LNG = _object(
    {
        "lat": _number("Latitude in degrees", minimum=-90, maximum=90),
        "lng": _number("Longitude in degrees", minimum=-180, maximum=180),
    },
    ("lat", "lng"),
    "A point on the map",
    closed=True,
)

# ---- the tool library --------------------------------------------------------------------------

_LIBRARY: tuple[_LibraryTool, ...] = (
    # -- file system
    _tool(
        "fs.read_file",
        "Read a text file from the workspace. Returns numbered lines.",
        _object(
            {
                "path": _PATH,
                "offset": _integer("First line to return (0-based)", minimum=0),
                "limit": _integer("Maximum number of lines", minimum=1, maximum=2000),
            },
            ("path",),
            closed=True,
        ),
        request="Show me the first 200 lines of src/server/main.py.",
        examples=(
            {"path": "src/server/main.py", "offset": 0, "limit": 200},
            {"path": "/etc/nginx/nginx.conf"},
        ),
        result="1\timport asyncio\n2\tfrom server import app\n3\t\n4\tasyncio.run(app.serve())",
    ),
    _tool(
        "fs.write_file",
        "Create or overwrite a file with the given content.",
        _object(
            {
                "path": _PATH,
                "content": _string("The full text to write"),
                "mode": _enum(("overwrite", "append"), "How to treat an existing file"),
                "create_dirs": _boolean("Create missing parent directories"),
            },
            ("path", "content"),
            closed=True,
        ),
        request="Create a .gitignore that ignores __pycache__ and .venv.",
        examples=(
            {"path": ".gitignore", "content": "__pycache__/\n.venv/\n", "mode": "overwrite"},
            {"path": "logs/run.log", "content": "done\n", "mode": "append", "create_dirs": True},
        ),
        result='{"bytes_written": 20}',
    ),
    _tool(
        "fs.list_dir",
        "List the entries of a directory.",
        _object(
            {
                "path": _PATH,
                "recursive": _boolean("Descend into subdirectories"),
                "max_depth": _integer("Depth limit when recursive", minimum=1, maximum=10),
                "include_hidden": _boolean("Include dot files"),
            },
            ("path",),
        ),
        request="What's in the tests directory, two levels deep?",
        examples=({"path": "tests", "recursive": True, "max_depth": 2}, {"path": "."}),
        result='["tests/unit/", "tests/unit/test_api.py", "tests/conftest.py"]',
    ),
    _tool(
        "fs.search",
        "Search file contents with a regular expression (ripgrep semantics).",
        _object(
            {
                "pattern": _string("Regular expression to search for", minLength=1),
                "path": _PATH,
                "file_glob": _string("Only search files matching this glob, e.g. *.py"),
                "case_sensitive": _boolean(),
                "context_lines": _integer("Lines of context around matches", minimum=0, maximum=10),
                "max_results": _integer(minimum=1, maximum=500, default=100),
            },
            ("pattern",),
        ),
        request="Find every place we call retry_with_backoff in the Python code.",
        examples=(
            {"pattern": "retry_with_backoff\\(", "path": "src", "file_glob": "*.py"},
            {"pattern": "TODO", "case_sensitive": False, "context_lines": 2, "max_results": 20},
        ),
        result="src/client.py:88:    return retry_with_backoff(send, attempts=5)",
    ),
    _tool(
        "fs.edit_file",
        "Apply exact search-and-replace edits to a file. Each old_text must occur exactly once.",
        _object(
            {
                "path": _PATH,
                "edits": _array(
                    _object(
                        {
                            "old_text": _string("Text to replace", minLength=1),
                            "new_text": _string("Replacement text"),
                        },
                        ("old_text", "new_text"),
                        closed=True,
                    ),
                    "Edits applied in order",
                    minItems=1,
                    maxItems=20,
                ),
                "dry_run": _boolean("Only show the diff"),
            },
            ("path", "edits"),
            closed=True,
        ),
        request="In config.yaml, raise the worker count from 4 to 8.",
        examples=(
            {
                "path": "config.yaml",
                "edits": [{"old_text": "workers: 4", "new_text": "workers: 8"}],
            },
            {
                "path": "README.md",
                "edits": [
                    {"old_text": "Python 3.10", "new_text": "Python 3.11"},
                    {"old_text": "pip install", "new_text": "uv pip install"},
                ],
                "dry_run": True,
            },
        ),
        result='{"applied": 1, "diff": "-workers: 4\\n+workers: 8"}',
    ),
    _tool(
        "fs.delete",
        "Delete a file or directory.",
        _object(
            {"path": _PATH, "recursive": _boolean("Required to delete a non-empty directory")},
            ("path",),
            closed=True,
        ),
        request="Delete the build/ directory, it's stale.",
        examples=({"path": "build", "recursive": True},),
        result='{"deleted": 214}',
    ),
    # -- shell and code execution
    _tool(
        "shell.exec",
        "Run a shell command in the sandbox and return its exit code, stdout and stderr.",
        _object(
            {
                "command": _string("Command line for /bin/bash -c", minLength=1, maxLength=4000),
                "cwd": _PATH,
                "timeout_seconds": _number(exclusiveMinimum=0, maximum=600),
                "env": _string_map("Extra environment variables"),
            },
            ("command",),
        ),
        request="Run the unit tests with pytest and tell me what fails.",
        examples=(
            {"command": "pytest -q tests/unit", "cwd": "/workspace", "timeout_seconds": 300},
            {"command": "make build", "env": {"CC": "clang", "NPROC": "8"}},
        ),
        result='{"exit_code": 1, "stdout": "2 failed, 118 passed in 9.31s", "stderr": ""}',
    ),
    _tool(
        "python-exec",
        "Execute Python 3 code in a persistent Jupyter kernel.",
        _object(
            {
                "code": _string("Python source", minLength=1),
                "timeout_seconds": _integer(minimum=1, maximum=300, default=30),
            },
            ("code",),
            closed=True,
        ),
        request="What is the standard deviation of 3, 7, 7, 19 and 24?",
        examples=(
            {"code": "import statistics\nprint(statistics.stdev([3, 7, 7, 19, 24]))"},
            {"code": "import sys; print(sys.version)", "timeout_seconds": 5},
        ),
        result="8.97217925415",
    ),
    _tool(
        "get_current_time",
        "Return the current date and time in the user's time zone.",
        _NO_PARAMETERS,
        request="What time is it right now?",
        examples=({},),
        result='{"now": "2025-07-14T09:31:05+02:00", "time_zone": "Europe/Berlin"}',
    ),
    _tool(
        "system.info",
        "Describe the sandbox: OS, CPU count, memory, disk and installed toolchains.",
        _NO_PARAMETERS,
        request="How much memory and disk does this machine have?",
        examples=({},),
        result='{"os": "Ubuntu 24.04", "cpus": 16, "memory_gb": 64, "disk_free_gb": 412}',
    ),
    _tool(
        "auth.whoami",
        "Return the identity and scopes of the current credentials.",
        _NO_PARAMETERS,
        request="Which account am I logged in as?",
        examples=({},),
        result='{"user": "maria.lopez@example.com", "scopes": ["repo", "read:org"]}',
    ),
    # -- web
    _tool(
        "web-search",
        "Search the web and return titles, URLs and snippets.",
        _object(
            {
                "query": _string("Search query", minLength=1, maxLength=400),
                "num_results": _integer(minimum=1, maximum=20, default=5),
                "recency": _enum(("day", "week", "month", "year", "any"), "Freshness filter"),
                "site": _nullable(
                    _string(format="hostname"), "Restrict results to this site, or null"
                ),
                "safe_search": _boolean(),
            },
            ("query",),
        ),
        request="Search for the latest news about the Kimi K2 model release.",
        examples=(
            {"query": "Kimi K2 model release", "num_results": 5, "recency": "week"},
            {"query": "asyncio TaskGroup cancellation", "site": "docs.python.org"},
            {"query": "rust borrow checker tutorial", "site": None, "safe_search": True},
        ),
        result='[{"title": "Moonshot AI releases Kimi K2", "url": "https://example.com/k2"}]',
    ),
    _tool(
        "web.fetch",
        "Fetch a web page and return it converted to the requested format.",
        _object(
            {
                "url": _string("Absolute http(s) URL", format="uri"),
                "format": _enum(("markdown", "text", "html"), default="markdown"),
                "max_bytes": _integer(minimum=1024, maximum=5000000),
            },
            ("url",),
            closed=True,
        ),
        request="Summarise https://peps.python.org/pep-0703/ for me.",
        examples=(
            {"url": "https://peps.python.org/pep-0703/", "format": "markdown"},
            {"url": "https://example.com/status", "format": "text", "max_bytes": 65536},
        ),
        result="# PEP 703 – Making the Global Interpreter Lock Optional in CPython ...",
    ),
    _tool(
        "browser.screenshot",
        "Open a URL in a headless browser and capture a PNG screenshot.",
        _object(
            {
                "url": _string(format="uri"),
                "viewport": _object(
                    {
                        "width": _integer(minimum=320, maximum=3840),
                        "height": _integer(minimum=240, maximum=2160),
                    },
                    ("width", "height"),
                    closed=True,
                ),
                "full_page": _boolean("Capture the whole scrollable page"),
                "wait_ms": _integer("Delay after load", minimum=0, maximum=30000),
            },
            ("url",),
        ),
        request="Take a full-page screenshot of https://example.com at 1280x800.",
        examples=(
            {
                "url": "https://example.com",
                "viewport": {"width": 1280, "height": 800},
                "full_page": True,
            },
            {"url": "https://status.example.org/", "wait_ms": 1500},
        ),
        result='{"image_uri": "https://files.example.com/shots/8c1e.png"}',
    ),
    # -- git and GitHub
    _tool(
        "git.status",
        "Show the working tree status of a git repository.",
        _object({"repo_path": _PATH, "short": _boolean()}, ("repo_path",)),
        request="Do I have uncommitted changes in ~/code/api?",
        examples=({"repo_path": "/home/maria/code/api", "short": True},),
        result=" M src/routes.py\n?? notes.txt",
    ),
    _tool(
        "git.commit",
        "Stage the given paths and create a commit.",
        _object(
            {
                "message": _string("Commit message", minLength=1, maxLength=500),
                "paths": _array(_PATH, "Paths to stage", minItems=1, maxItems=200),
                "author": _object(
                    {"name": _string(minLength=1), "email": _string(format="email")},
                    ("name", "email"),
                ),
                "amend": _boolean(),
            },
            ("message", "paths"),
            closed=True,
        ),
        request="Commit the routes change with the message 'Fix pagination off-by-one'.",
        examples=(
            {"message": "Fix pagination off-by-one", "paths": ["src/routes.py"]},
            {
                "message": "Update docs",
                "paths": ["README.md", "docs/usage.md"],
                "author": {"name": "Maria Lopez", "email": "maria.lopez@example.com"},
                "amend": False,
            },
        ),
        result="[main 4e1c2ab] Fix pagination off-by-one\n 1 file changed, 2 insertions(+)",
    ),
    _tool(
        "git.diff",
        "Show the diff between two revisions, optionally limited to some paths.",
        _object(
            {
                "base": _string("Base revision", default="HEAD"),
                "head": _nullable(_string(), "Head revision; null for the working tree"),
                "paths": _array(_PATH, maxItems=50),
                "stat_only": _boolean("Only the diffstat"),
            },
        ),
        request="What changed between main and my feature branch?",
        examples=(
            {"base": "main", "head": "feature/pagination", "stat_only": True},
            {"base": "HEAD~1", "head": None, "paths": ["src/routes.py"]},
            {},
        ),
        result=" src/routes.py | 4 ++--\n 1 file changed, 2 insertions(+), 2 deletions(-)",
    ),
    _tool(
        "github.issues.create",
        "Open an issue in a GitHub repository.",
        _object(
            {
                "owner": _GITHUB_OWNER,
                "repo": _GITHUB_REPO,
                "title": _string(minLength=1, maxLength=256),
                "body": _string("Markdown body"),
                "labels": _array(_string(maxLength=50), maxItems=10),
                "assignees": _array(_string(pattern=r"^[A-Za-z0-9-]{1,39}$"), maxItems=10),
                "milestone": _nullable(_integer(minimum=1), "Milestone number"),
            },
            ("owner", "repo", "title"),
            closed=True,
        ),
        request="File a bug in acme/webapp: login button does nothing on Safari.",
        examples=(
            {"owner": "acme", "repo": "webapp", "title": "Login button does nothing on Safari"},
            {
                "owner": "acme",
                "repo": "webapp",
                "title": "Crash when the cart is empty",
                "body": "Steps to reproduce:\n1. Open /cart\n2. Click checkout",
                "labels": ["bug", "p1"],
                "assignees": ["mlopez"],
                "milestone": None,
            },
        ),
        result='{"number": 1432, "html_url": "https://github.com/acme/webapp/issues/1432"}',
    ),
    _tool(
        "github.pulls.create",
        "Open a pull request.",
        _object(
            {
                "owner": _GITHUB_OWNER,
                "repo": _GITHUB_REPO,
                "title": _string(minLength=1, maxLength=256),
                "head": _string("Branch with the changes"),
                "base": _string("Branch to merge into"),
                "body": _string(),
                "draft": _boolean(),
                "reviewers": _array(_string(), maxItems=15),
            },
            ("owner", "repo", "title", "head", "base"),
            closed=True,
        ),
        request="Open a draft PR in acme/webapp from fix/safari-login into main.",
        examples=(
            {
                "owner": "acme",
                "repo": "webapp",
                "title": "Fix Safari login",
                "head": "fix/safari-login",
                "base": "main",
                "draft": True,
            },
        ),
        result='{"number": 1433, "state": "open", "draft": true}',
    ),
    _tool(
        "github.repos.search",
        "Search GitHub repositories.",
        _object(
            {
                "q": _string("GitHub search syntax", minLength=1),
                "sort": _enum(("stars", "forks", "updated", "best-match")),
                "order": _enum(("asc", "desc")),
                "per_page": _integer(minimum=1, maximum=100),
            },
            ("q",),
        ),
        request="Find the most starred Rust HTTP client libraries on GitHub.",
        examples=(
            {"q": "http client language:rust", "sort": "stars", "order": "desc", "per_page": 10},
            {"q": "topic:llm-inference"},
        ),
        result='[{"full_name": "seanmonstar/reqwest", "stargazers_count": 10400}]',
    ),
    _tool(
        "github.actions.dispatch-workflow",
        "Trigger a workflow_dispatch run of a GitHub Actions workflow.",
        _object(
            {
                "owner": _GITHUB_OWNER,
                "repo": _GITHUB_REPO,
                "workflow": {
                    "anyOf": [
                        _integer("Workflow id", minimum=1),
                        _string("Workflow file name", pattern=r"^[\w.-]+\.ya?ml$"),
                    ]
                },
                "ref": _string("Branch or tag to run on"),
                "inputs": _string_map("Workflow inputs"),
            },
            ("owner", "repo", "workflow", "ref"),
        ),
        request="Kick off the deploy.yml workflow in acme/webapp on main for staging.",
        examples=(
            {
                "owner": "acme",
                "repo": "webapp",
                "workflow": "deploy.yml",
                "ref": "main",
                "inputs": {"environment": "staging"},
            },
            {"owner": "acme", "repo": "webapp", "workflow": 60123, "ref": "v2.3.0"},
        ),
        result='{"status": 204}',
    ),
    # -- calendar
    _tool(
        "calendar.create_event",
        "Create a calendar event and invite attendees.",
        _object(
            {
                "title": _string(minLength=1, maxLength=200),
                "start": _string(format="date-time"),
                "end": _string(format="date-time"),
                "attendees": _array(_ref("Attendee"), maxItems=50),
                "location": _string(),
                "reminders": _array(
                    _object(
                        {
                            "method": _enum(("email", "popup")),
                            "minutes_before": _integer(minimum=0, maximum=40320),
                        },
                        ("method", "minutes_before"),
                        closed=True,
                    ),
                    maxItems=5,
                ),
                "recurrence": _nullable(_ref("Recurrence")),
            },
            ("title", "start", "end"),
            closed=True,
            defs={
                "Attendee": _object(
                    {"email": _string(format="email"), "optional": _boolean()},
                    ("email",),
                    "A person invited to the event",
                    closed=True,
                ),
                "Recurrence": _object(
                    {
                        "frequency": _enum(("daily", "weekly", "monthly", "yearly")),
                        "interval": _integer(minimum=1, maximum=99),
                        "until": _string(format="date"),
                    },
                    ("frequency",),
                    "How the event repeats",
                    closed=True,
                ),
            },
        ),
        request="Book a 30-minute sync with jan@example.com tomorrow at 10:00 Berlin time.",
        examples=(
            {
                "title": "Sync",
                "start": "2025-07-15T10:00:00+02:00",
                "end": "2025-07-15T10:30:00+02:00",
                "attendees": [{"email": "jan@example.com"}],
            },
            {
                "title": "Team standup",
                "start": "2025-07-14T07:00:00Z",
                "end": "2025-07-14T07:15:00Z",
                "attendees": [
                    {"email": "jan@example.com", "optional": False},
                    {"email": "li.wei@example.org", "optional": True},
                ],
                "location": "Room 4.12",
                "reminders": [{"method": "popup", "minutes_before": 10}],
                "recurrence": {"frequency": "weekly", "interval": 1, "until": "2025-12-19"},
            },
        ),
        result='{"event_id": "evt_7Qx2", "status": "confirmed"}',
    ),
    _tool(
        "calendar.list_events",
        "List events in a time range.",
        _object(
            {
                "calendar_id": _string(default="primary"),
                "time_min": _string(format="date-time"),
                "time_max": _string(format="date-time"),
                "max_results": _integer(minimum=1, maximum=250),
                "query": _string("Free-text filter"),
            },
            ("time_min", "time_max"),
        ),
        request="What's on my calendar next Monday?",
        examples=(
            {"time_min": "2025-07-21T00:00:00+02:00", "time_max": "2025-07-22T00:00:00+02:00"},
            {
                "calendar_id": "team@example.com",
                "time_min": "2025-07-01T00:00:00Z",
                "time_max": "2025-08-01T00:00:00Z",
                "max_results": 50,
                "query": "offsite",
            },
        ),
        result='[{"title": "1:1 with Jan", "start": "2025-07-21T11:00:00+02:00"}]',
    ),
    _tool(
        "calendar.find_free_slots",
        "Find times when all attendees are free on a given day.",
        _object(
            {
                "attendees": _array(_string(format="email"), minItems=1, maxItems=20),
                "date": _string(format="date"),
                "duration_minutes": _integer(minimum=15, maximum=480),
                "working_hours": _object(
                    {"start": _string(format="time"), "end": _string(format="time")},
                    ("start", "end"),
                ),
            },
            ("attendees", "date", "duration_minutes"),
        ),
        request="When are Jan and Li both free for an hour on July 16?",
        examples=(
            {
                "attendees": ["jan@example.com", "li.wei@example.org"],
                "date": "2025-07-16",
                "duration_minutes": 60,
            },
            {
                "attendees": ["ops@example.com"],
                "date": "2025-07-18",
                "duration_minutes": 30,
                "working_hours": {"start": "09:00:00+02:00", "end": "17:30:00+02:00"},
            },
        ),
        result='[{"start": "2025-07-16T14:00:00+02:00", "end": "2025-07-16T15:00:00+02:00"}]',
    ),
    # -- email
    _tool(
        "email.send",
        "Send an email from the user's account.",
        _object(
            {
                "to": _array(_string(format="email"), minItems=1, maxItems=50),
                "cc": _array(_string(format="email"), maxItems=50),
                "subject": _string(maxLength=998),
                "body": _string(),
                "body_format": _enum(("plain", "html")),
                "attachments": _array(
                    _object(
                        {
                            "filename": _string(minLength=1, maxLength=255),
                            "url": _string(format="uri"),
                            "mime_type": _string(pattern=r"^[a-z]+/[a-z0-9.+-]+$"),
                        },
                        ("filename", "url"),
                    ),
                    maxItems=10,
                ),
            },
            ("to", "subject", "body"),
            closed=True,
        ),
        request="Email jan@example.com that the release moved to Thursday.",
        examples=(
            {
                "to": ["jan@example.com"],
                "subject": "Release moved to Thursday",
                "body": "Hi Jan,\n\nthe release moved to Thursday.\n\nMaria",
            },
            {
                "to": ["finance@example.com"],
                "cc": ["maria.lopez@example.com"],
                "subject": "Q2 report",
                "body": "<p>Attached.</p>",
                "body_format": "html",
                "attachments": [
                    {
                        "filename": "q2.pdf",
                        "url": "https://files.example.com/q2.pdf",
                        "mime_type": "application/pdf",
                    }
                ],
            },
        ),
        result='{"message_id": "<c0ffee@mail.example.com>", "status": "sent"}',
    ),
    _tool(
        "email.search",
        "Search the user's mailbox.",
        _object(
            {
                "query": _string(),
                "folder": _enum(("inbox", "sent", "archive", "spam", "all"), default="inbox"),
                "unread_only": _boolean(),
                "since": _string(format="date"),
                "limit": _integer(minimum=1, maximum=100),
            },
        ),
        request="Do I have unread emails from the landlord since June?",
        examples=(
            {"query": "from:landlord", "unread_only": True, "since": "2025-06-01"},
            {"folder": "sent", "limit": 5},
        ),
        result='[{"from": "landlord@example.net", "subject": "Heating maintenance"}]',
    ),
    # -- databases
    _tool(
        "sql.query",
        "Run a read-only SQL query against an analytics database.",
        _object(
            {
                "database": _enum(("analytics", "orders", "users")),
                "sql": _string(minLength=1, maxLength=10000),
                "params": _array(
                    {
                        "anyOf": [
                            _string(),
                            _number(),
                            _boolean(),
                            {"type": "null"},
                        ]
                    },
                    "Positional parameters for $1, $2, ...",
                    maxItems=100,
                ),
                "read_only": _boolean(const=True),
                "timeout_ms": _integer(minimum=100, maximum=120000),
            },
            ("database", "sql"),
            closed=True,
        ),
        request="How many orders did we get per day last week?",
        examples=(
            {
                "database": "orders",
                "sql": "SELECT date(created_at) AS day, count(*) FROM orders "
                "WHERE created_at >= $1 GROUP BY day ORDER BY day",
                "params": ["2025-07-07"],
                "read_only": True,
            },
            {
                "database": "users",
                "sql": "SELECT id FROM users WHERE plan = $1 AND active = $2 LIMIT $3",
                "params": ["pro", True, 10],
                "timeout_ms": 5000,
            },
        ),
        result='[["2025-07-07", 412], ["2025-07-08", 389]]',
    ),
    _tool(
        "db.describe_table",
        "Return the columns, types, indexes and row estimate of a table.",
        _object(
            {
                "schema": _string(pattern=r"^[a-z_][a-z0-9_]*$", default="public"),
                "table": _string(pattern=r"^[a-z_][a-z0-9_]*$", maxLength=63),
            },
            ("table",),
            closed=True,
        ),
        request="What columns does the orders table have?",
        examples=({"table": "orders"}, {"schema": "billing", "table": "invoices"}),
        result='{"columns": [["id", "bigint"], ["created_at", "timestamptz"]], "rows": 1200000}',
    ),
    _tool(
        "mongo.find",
        "Find documents in a MongoDB collection.",
        _object(
            {
                "collection": _string(minLength=1),
                "filter": {"type": "object", "description": "MongoDB query document"},
                "projection": {
                    "type": "object",
                    "description": "Fields to include (1) or exclude (0)",
                    "additionalProperties": _integer(enum=[0, 1]),
                },
                "sort": _array(
                    _object(
                        {
                            "field": _string(),
                            "direction": _integer(enum=[1, -1]),
                        },
                        ("field", "direction"),
                    ),
                    maxItems=4,
                ),
                "limit": _integer(minimum=1, maximum=1000),
            },
            ("collection",),
        ),
        request="Show the 10 newest failed jobs from the jobs collection.",
        examples=(
            {
                "collection": "jobs",
                "filter": {"status": "failed"},
                "sort": [{"field": "created_at", "direction": -1}],
                "limit": 10,
            },
            {"collection": "users", "projection": {"email": 1, "_id": 0}},
        ),
        result='[{"_id": "66f0a1", "status": "failed", "error": "timeout"}]',
    ),
    _tool(
        "cache.get",
        "Read a key from the Redis cache.",
        _object({"key": _string(minLength=1, maxLength=512)}, ("key",), closed=True),
        request="What's cached under session:8c1e?",
        examples=({"key": "session:8c1e"},),
        result='{"value": "{\\"user_id\\": 42}", "ttl_seconds": 1740}',
        strict=True,
    ),
    # -- HTTP APIs
    _tool(
        "http.request",
        "Send an HTTP request and return status, headers and body.",
        _object(
            {
                "method": _enum(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")),
                "url": _string(format="uri"),
                "headers": _string_map("Request headers"),
                "body": {
                    "anyOf": [_string(), {"type": "object"}, {"type": "null"}],
                    "description": "Raw text, a JSON object, or null for no body",
                },
                "timeout_seconds": _number(exclusiveMinimum=0, maximum=120),
                "follow_redirects": _boolean(default=True),
            },
            ("method", "url"),
        ),
        request='POST {"name": "demo"} to https://api.example.com/v1/projects.',
        examples=(
            {
                "method": "POST",
                "url": "https://api.example.com/v1/projects",
                "headers": {"Content-Type": "application/json"},
                "body": {"name": "demo"},
            },
            {
                "method": "GET",
                "url": "https://api.example.com/v1/health",
                "body": None,
                "timeout_seconds": 2.5,
                "follow_redirects": False,
            },
        ),
        result='{"status": 201, "body": {"id": "prj_91", "name": "demo"}}',
    ),
    _tool(
        "webhooks.register",
        "Register a webhook endpoint for account events.",
        _object(
            {
                "url": _string(format="uri"),
                "events": _array(
                    _enum(("order.created", "order.paid", "order.refunded", "customer.created")),
                    minItems=1,
                    maxItems=4,
                ),
                "secret": _string(minLength=16, maxLength=128),
                "active": _boolean(),
            },
            ("url", "events"),
            closed=True,
        ),
        request="Send order.paid and order.refunded events to https://hooks.example.com/shop.",
        examples=(
            {
                "url": "https://hooks.example.com/shop",
                "events": ["order.paid", "order.refunded"],
            },
            {
                "url": "https://ci.example.org/hook",
                "events": ["customer.created"],
                "secret": "s3cr3t-0123456789abcdef",
                "active": False,
            },
        ),
        result='{"webhook_id": "wh_55", "active": true}',
    ),
    # -- Kubernetes
    _tool(
        "k8s.pods-list",
        "List pods in a namespace.",
        _object(
            {
                "namespace": _K8S_NAME,
                "label_selector": _string("e.g. app=web,tier!=cache"),
                "field_selector": _string("e.g. status.phase=Running"),
                "limit": _integer(minimum=1, maximum=500),
            },
            ("namespace",),
        ),
        request="List the pods of the checkout app in the prod namespace.",
        examples=(
            {"namespace": "prod", "label_selector": "app=checkout"},
            {"namespace": "kube-system", "field_selector": "status.phase!=Running", "limit": 50},
        ),
        result="checkout-7d9f-abc12  Running  0 restarts\ncheckout-7d9f-def34  CrashLoopBackOff",
    ),
    _tool(
        "k8s.pods-logs",
        "Fetch logs of a pod's container.",
        _object(
            {
                "namespace": _K8S_NAME,
                "pod": _string(minLength=1, maxLength=253),
                "container": _string(),
                "tail_lines": _integer(minimum=1, maximum=10000),
                "since_seconds": _integer(exclusiveMinimum=0),
                "previous": _boolean("Logs of the previous, crashed container"),
            },
            ("namespace", "pod"),
        ),
        request="Why is checkout-7d9f-def34 crash-looping? Check its previous logs.",
        examples=(
            {
                "namespace": "prod",
                "pod": "checkout-7d9f-def34",
                "tail_lines": 200,
                "previous": True,
            },
            {"namespace": "staging", "pod": "api-0", "container": "envoy", "since_seconds": 600},
        ),
        result="panic: dial tcp 10.0.3.7:5432: connect: connection refused",
    ),
    _tool(
        "k8s.deployments-scale",
        "Set the replica count of a deployment.",
        _object(
            {
                "namespace": _K8S_NAME,
                "name": _K8S_NAME,
                "replicas": _integer(minimum=0, maximum=100),
            },
            ("namespace", "name", "replicas"),
            closed=True,
        ),
        request="Scale the checkout deployment in prod to 6 replicas.",
        examples=({"namespace": "prod", "name": "checkout", "replicas": 6},),
        result='{"replicas": 6, "ready": 4}',
        strict=True,
    ),
    _tool(
        "k8s.rollout-restart",
        "Restart the pods of a workload with a rolling update.",
        _object(
            {
                "namespace": _K8S_NAME,
                "kind": _enum(("deployment", "statefulset", "daemonset")),
                "name": _K8S_NAME,
            },
            ("namespace", "kind", "name"),
            closed=True,
        ),
        request="Restart the redis statefulset in the cache namespace.",
        examples=({"namespace": "cache", "kind": "statefulset", "name": "redis"},),
        result='{"restarted_at": "2025-07-14T09:40:12Z"}',
    ),
    _tool(
        "k8s.apply-deployment",
        "Create or update a Deployment.",
        _object(
            {
                "api_version": _string(const="apps/v1"),
                "metadata": _object(
                    {
                        "name": _K8S_NAME,
                        "namespace": _K8S_NAME,
                        "labels": _string_map("Labels to set"),
                    },
                    ("name", "namespace"),
                    closed=True,
                ),
                "spec": _object(
                    {
                        "replicas": _integer(minimum=0, maximum=100),
                        "template": _object(
                            {
                                "containers": _array(_ref("Container"), minItems=1, maxItems=8),
                                "service_account": _string(),
                                "node_selector": _string_map("Node labels to schedule on"),
                            },
                            ("containers",),
                            "The pod template",
                        ),
                        "strategy": _object(
                            {
                                "type": _enum(("RollingUpdate", "Recreate")),
                                "rolling_update": _object(
                                    {
                                        "max_surge": {
                                            "anyOf": [
                                                _integer(minimum=0),
                                                _string(pattern=r"^[0-9]{1,3}%$"),
                                            ]
                                        },
                                        "max_unavailable": {
                                            "anyOf": [
                                                _integer(minimum=0),
                                                _string(pattern=r"^[0-9]{1,3}%$"),
                                            ]
                                        },
                                    },
                                    closed=True,
                                ),
                            },
                            ("type",),
                        ),
                    },
                    ("template",),
                    closed=True,
                ),
            },
            ("api_version", "metadata", "spec"),
            closed=True,
            defs={
                "Container": _object(
                    {
                        "name": _K8S_NAME,
                        "image": _string(minLength=1, maxLength=512),
                        "ports": _array(
                            _object(
                                {
                                    "container_port": _integer(minimum=1, maximum=65535),
                                    "protocol": _enum(("TCP", "UDP", "SCTP"), default="TCP"),
                                },
                                ("container_port",),
                                closed=True,
                            ),
                            maxItems=16,
                        ),
                        "env": _array(
                            _object(
                                {
                                    "name": _string(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
                                    "value": _string(),
                                },
                                ("name", "value"),
                                closed=True,
                            ),
                            maxItems=64,
                        ),
                        "resources": _object(
                            {"limits": _ref("Resources"), "requests": _ref("Resources")},
                            closed=True,
                        ),
                    },
                    ("name", "image"),
                    "One container of the pod",
                    closed=True,
                ),
                "Resources": _object(
                    {
                        "cpu": _string("CPU, e.g. 500m or 2", pattern=r"^[0-9]+(\.[0-9]+)?m?$"),
                        "memory": _string("Memory, e.g. 256Mi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$"),
                    },
                    closed=True,
                ),
            },
        ),
        request="Deploy nginx:1.27 as 'web' in the staging namespace with 2 replicas on port 80.",
        examples=(
            {
                "api_version": "apps/v1",
                "metadata": {"name": "web", "namespace": "staging"},
                "spec": {
                    "replicas": 2,
                    "template": {
                        "containers": [
                            {
                                "name": "web",
                                "image": "nginx:1.27",
                                "ports": [{"container_port": 80}],
                            }
                        ]
                    },
                },
            },
            {
                "api_version": "apps/v1",
                "metadata": {"name": "api", "namespace": "prod", "labels": {"team": "core"}},
                "spec": {
                    "replicas": 3,
                    "template": {
                        "containers": [
                            {
                                "name": "api",
                                "image": "registry.example.com/api:2.3.0",
                                "ports": [{"container_port": 8080, "protocol": "TCP"}],
                                "env": [{"name": "LOG_LEVEL", "value": "info"}],
                                "resources": {
                                    "limits": {"cpu": "2", "memory": "1Gi"},
                                    "requests": {"cpu": "500m", "memory": "512Mi"},
                                },
                            }
                        ],
                        "service_account": "api",
                    },
                    "strategy": {
                        "type": "RollingUpdate",
                        "rolling_update": {"max_surge": "25%", "max_unavailable": 0},
                    },
                },
            },
        ),
        result='{"deployment": "staging/web", "generation": 1, "available_replicas": 0}',
    ),
    # -- payments and billing
    _tool(
        "payments.create_charge",
        "Charge a customer's default payment method.",
        _object(
            {
                "amount": _integer(
                    "Amount in the smallest currency unit", minimum=50, maximum=99999999
                ),
                "currency": _CURRENCY,
                "customer_id": _string(pattern=r"^cus_[A-Za-z0-9]{8,24}$"),
                "description": _string(maxLength=1000),
                "metadata": _string_map("Your own key-value data"),
                "idempotency_key": _string(format="uuid"),
                "capture": _boolean("Capture now; false only authorises"),
            },
            ("amount", "currency", "customer_id"),
            closed=True,
        ),
        request="Charge customer cus_Nf2kX81aQ 49.90 EUR for the annual plan.",
        examples=(
            {
                "amount": 4990,
                "currency": "eur",
                "customer_id": "cus_Nf2kX81aQ",
                "description": "Annual plan",
            },
            {
                "amount": 120000,
                "currency": "usd",
                "customer_id": "cus_Q7bLmP03xZk2",
                "metadata": {"order_id": "A-1043"},
                "idempotency_key": "3f2b8c1e-7a4d-4e5b-9c6f-1a2b3c4d5e6f",
                "capture": False,
            },
        ),
        result='{"charge_id": "ch_3Pq9", "status": "succeeded"}',
    ),
    _tool(
        "payments.refund",
        "Refund a charge fully or partially.",
        _object(
            {
                "charge_id": _string(pattern=r"^ch_[A-Za-z0-9]+$"),
                "amount": _nullable(_integer(minimum=1), "Amount to refund; null for all of it"),
                "reason": _enum(("duplicate", "fraudulent", "requested_by_customer")),
            },
            ("charge_id", "amount", "reason"),
            closed=True,
        ),
        request="Refund charge ch_3Pq9 in full, the customer asked for it.",
        examples=(
            {"charge_id": "ch_3Pq9", "amount": None, "reason": "requested_by_customer"},
            {"charge_id": "ch_88Aa", "amount": 1500, "reason": "duplicate"},
        ),
        result='{"refund_id": "re_1Kx", "status": "pending"}',
        strict=True,
    ),
    _tool(
        "invoices.create",
        "Create and send an invoice.",
        _object(
            {
                "customer": _object(
                    {
                        "name": _string(minLength=1),
                        "email": _string(format="email"),
                        "address": _ref("PostalAddress"),
                    },
                    ("name", "email"),
                ),
                "line_items": _array(
                    _object(
                        {
                            "description": _string(minLength=1, maxLength=500),
                            "quantity": _integer(exclusiveMinimum=0),
                            "unit_price": _number(minimum=0),
                        },
                        ("description", "quantity", "unit_price"),
                        closed=True,
                    ),
                    minItems=1,
                    maxItems=100,
                ),
                "currency": _CURRENCY,
                "due_date": _string(format="date"),
                "notes": _nullable(_string(maxLength=2000)),
            },
            ("customer", "line_items", "currency"),
            defs={
                "PostalAddress": _object(
                    {
                        "line1": _string(),
                        "city": _string(),
                        "postal_code": _string(maxLength=16),
                        "country": _string("ISO 3166-1 alpha-2", pattern=r"^[A-Z]{2}$"),
                    },
                    ("line1", "city", "country"),
                ),
            },
        ),
        request="Invoice Globex (ap@globex.example) for 12 hours of consulting at 150 USD.",
        examples=(
            {
                "customer": {"name": "Globex", "email": "ap@globex.example"},
                "line_items": [
                    {"description": "Consulting (hours)", "quantity": 12, "unit_price": 150}
                ],
                "currency": "usd",
            },
            {
                "customer": {
                    "name": "Initech GmbH",
                    "email": "billing@initech.example",
                    "address": {
                        "line1": "Hauptstr. 5",
                        "city": "Berlin",
                        "postal_code": "10115",
                        "country": "DE",
                    },
                },
                "line_items": [
                    {"description": "Licence", "quantity": 3, "unit_price": 99.5},
                    {"description": "Onboarding", "quantity": 1, "unit_price": 400},
                ],
                "currency": "eur",
                "due_date": "2025-08-15",
                "notes": None,
            },
        ),
        result='{"invoice_id": "in_204", "total": 1800, "status": "sent"}',
    ),
    # -- maps and travel
    _tool(
        "maps.geocode",
        "Turn an address into coordinates.",
        _object(
            {
                "address": _string(minLength=1, maxLength=300),
                "region": _string("Country bias, ISO 3166-1 alpha-2", pattern=r"^[A-Z]{2}$"),
            },
            ("address",),
        ),
        request="What are the coordinates of the Brandenburg Gate?",
        examples=(
            {"address": "Pariser Platz, 10117 Berlin", "region": "DE"},
            {"address": "1600 Amphitheatre Parkway"},
        ),
        result='{"lat": 52.516275, "lng": 13.377704}',
    ),
    _tool(
        "maps.directions",
        "Route between two places.",
        _object(
            {
                "origin": _ref("Place"),
                "destination": _ref("Place"),
                "mode": _enum(("driving", "walking", "bicycling", "transit")),
                "departure_time": _string(format="date-time"),
                "avoid": _array(_enum(("tolls", "highways", "ferries")), maxItems=3),
            },
            ("origin", "destination"),
            closed=True,
            defs={
                "LatLng": _LAT_LNG,
                "Place": {
                    "anyOf": [
                        _ref("LatLng"),
                        _object(
                            {"address": _string(minLength=1)},
                            ("address",),
                            closed=True,
                        ),
                    ],
                    "description": "Coordinates or a street address",
                },
            },
        ),
        request="How long does it take to cycle from Alexanderplatz to Tempelhofer Feld?",
        examples=(
            {
                "origin": {"address": "Alexanderplatz, Berlin"},
                "destination": {"address": "Tempelhofer Feld, Berlin"},
                "mode": "bicycling",
            },
            {
                "origin": {"lat": 48.8584, "lng": 2.2945},
                "destination": {"address": "Gare de Lyon, Paris"},
                "mode": "driving",
                "departure_time": "2025-07-14T17:00:00+02:00",
                "avoid": ["tolls", "highways"],
            },
        ),
        result='{"duration_minutes": 24, "distance_km": 6.1}',
    ),
    _tool(
        "maps.places-nearby",
        "Find places of a kind near a point.",
        _object(
            {
                "location": _ref("LatLng"),
                "radius_m": _number(exclusiveMinimum=0, maximum=50000),
                "kind": _enum(("restaurant", "cafe", "pharmacy", "atm", "hospital", "gas_station")),
                "open_now": _boolean(),
                "min_rating": _number(minimum=0, maximum=5),
            },
            ("location", "radius_m"),
            defs={"LatLng": _LAT_LNG},
        ),
        request="Any pharmacies open now within 1 km of 52.52, 13.405?",
        examples=(
            {
                "location": {"lat": 52.52, "lng": 13.405},
                "radius_m": 1000,
                "kind": "pharmacy",
                "open_now": True,
            },
            {"location": {"lat": -33.8688, "lng": 151.2093}, "radius_m": 250.5, "min_rating": 4.2},
        ),
        result='[{"name": "Apotheke am Alex", "distance_m": 310, "open": true}]',
    ),
    _tool(
        "flights.search",
        "Search flight offers.",
        _object(
            {
                "origin": _string("IATA airport code", pattern=r"^[A-Z]{3}$"),
                "destination": _string("IATA airport code", pattern=r"^[A-Z]{3}$"),
                "departure_date": _string(format="date"),
                "return_date": _nullable(_string(format="date"), "null for one way"),
                "passengers": _object(
                    {
                        "adults": _integer(minimum=1, maximum=9),
                        "children": _integer(minimum=0, maximum=8),
                        "infants": _integer(minimum=0, maximum=4),
                    },
                    ("adults",),
                    closed=True,
                ),
                "cabin": _enum(("economy", "premium_economy", "business", "first")),
                "max_stops": _integer(minimum=0, maximum=3),
            },
            ("origin", "destination", "departure_date", "passengers"),
            closed=True,
        ),
        request="Find a one-way flight Berlin to Lisbon on August 3 for two adults.",
        examples=(
            {
                "origin": "BER",
                "destination": "LIS",
                "departure_date": "2025-08-03",
                "return_date": None,
                "passengers": {"adults": 2},
            },
            {
                "origin": "JFK",
                "destination": "NRT",
                "departure_date": "2025-10-01",
                "return_date": "2025-10-15",
                "passengers": {"adults": 2, "children": 1, "infants": 0},
                "cabin": "premium_economy",
                "max_stops": 1,
            },
        ),
        result='[{"carrier": "TP", "departs": "2025-08-03T06:55:00+02:00", "price_eur": 129}]',
    ),
    # -- weather
    _tool(
        "get_weather",
        "Get the current weather and a daily forecast for a location.",
        _object(
            {
                "location": _string("City name, optionally with country, e.g. Paris, FR"),
                "unit": _enum(("celsius", "fahrenheit"), default="celsius"),
                "days": _integer("Forecast days", minimum=1, maximum=14),
            },
            ("location",),
        ),
        request="What's the weather in Beijing this week?",
        examples=(
            {"location": "Beijing, CN", "days": 7},
            {"location": "Boston", "unit": "fahrenheit"},
        ),
        result='{"now": {"temp": 31, "condition": "sunny"}, "forecast": ["sunny", "rain"]}',
        strict=False,
    ),
    _tool(
        "weather.alerts",
        "Active severe-weather alerts near a point.",
        _object(
            {
                "lat": _number(minimum=-90, maximum=90),
                "lng": _number(minimum=-180, maximum=180),
                "min_severity": _enum(("minor", "moderate", "severe", "extreme")),
            },
            ("lat", "lng"),
            closed=True,
        ),
        request="Are there any storm warnings for Miami right now?",
        examples=(
            {"lat": 25.7617, "lng": -80.1918, "min_severity": "moderate"},
            {"lat": 35, "lng": 139},
        ),
        result='[{"event": "Tropical Storm Warning", "severity": "severe"}]',
    ),
    # -- tickets and incidents
    _tool(
        "jira.create-issue",
        "Create a Jira issue.",
        _object(
            {
                "project_key": _string(pattern=r"^[A-Z][A-Z0-9]{1,9}$"),
                "summary": _string(minLength=1, maxLength=255),
                "issue_type": _enum(("Bug", "Task", "Story", "Epic")),
                "priority": _enum(("Highest", "High", "Medium", "Low", "Lowest")),
                "description": _string(),
                "assignee": _nullable(_string(format="email"), "null leaves it unassigned"),
                "labels": _array(_string(pattern=r"^\S+$"), maxItems=20),
                "due_date": _string(format="date"),
                "story_points": _number(minimum=0, maximum=100),
            },
            ("project_key", "summary", "issue_type"),
        ),
        request="Create a Jira bug in PAY: refunds over 10k fail with a 500.",
        examples=(
            {
                "project_key": "PAY",
                "summary": "Refunds over 10k fail with 500",
                "issue_type": "Bug",
            },
            {
                "project_key": "WEB2",
                "summary": "Migrate settings page to React",
                "issue_type": "Story",
                "priority": "Medium",
                "assignee": None,
                "labels": ["frontend", "tech-debt"],
                "due_date": "2025-09-30",
                "story_points": 5,
            },
        ),
        result='{"key": "PAY-1187", "url": "https://jira.example.com/browse/PAY-1187"}',
    ),
    _tool(
        "tickets.update",
        "Update a support ticket's status and add a comment.",
        _object(
            {
                "ticket_id": _integer(minimum=1),
                "status": _enum(("open", "pending", "on_hold", "solved", "closed")),
                "comment": _object(
                    {
                        "body": _string(minLength=1, maxLength=65535),
                        "public": _boolean("Visible to the requester"),
                    },
                    ("body",),
                ),
                "tags": _array(_string(), maxItems=30),
            },
            ("ticket_id",),
        ),
        request="Mark ticket 88213 as solved and tell the customer the refund went out.",
        examples=(
            {
                "ticket_id": 88213,
                "status": "solved",
                "comment": {"body": "Your refund has been issued.", "public": True},
            },
            {"ticket_id": 1, "tags": ["billing", "vip"]},
        ),
        result='{"ticket_id": 88213, "status": "solved"}',
    ),
    _tool(
        "pagerduty.create-incident",
        "Open an incident and page the on-call responder.",
        _object(
            {
                "service_id": _string(pattern=r"^P[A-Z0-9]{6}$"),
                "title": _string(minLength=1, maxLength=1024),
                "urgency": _enum(("high", "low")),
                "details": _string(),
                "dedup_key": _nullable(_string(maxLength=255)),
            },
            ("service_id", "title", "urgency"),
            closed=True,
        ),
        request="Page the on-call for checkout: error rate above 5%.",
        examples=(
            {"service_id": "PX7K2QZ", "title": "Checkout error rate above 5%", "urgency": "high"},
            {
                "service_id": "PAB12CD",
                "title": "Disk 85% on db-2",
                "urgency": "low",
                "details": "/var/lib/postgresql at 85%",
                "dedup_key": "db-2-disk",
            },
        ),
        result='{"incident_number": 5521, "status": "triggered"}',
    ),
    # -- messaging, notes and productivity
    _tool(
        "slack.post_message",
        "Post a message to a Slack channel or thread.",
        _object(
            {
                "channel": _string("Channel name or id", pattern=r"^[#@]?[a-z0-9._-]{1,80}$"),
                "text": _string(minLength=1, maxLength=4000),
                "thread_ts": _string(pattern=r"^[0-9]{10}\.[0-9]{6}$"),
                "unfurl_links": _boolean(),
            },
            ("channel", "text"),
        ),
        request="Tell #deploys that 2.3.0 is rolling out to prod.",
        examples=(
            {"channel": "#deploys", "text": "2.3.0 is rolling out to prod :rocket:"},
            {
                "channel": "c024be7lr",
                "text": "Fixed, see the PR.",
                "thread_ts": "1720950000.123456",
                "unfurl_links": False,
            },
        ),
        result='{"ok": true, "ts": "1720951234.000200"}',
    ),
    _tool(
        "notes.create",
        "Save a note to the user's notebook.",
        _object(
            {
                "title": _string(maxLength=120),
                "content": _string(),
                "tags": _array(_string(), maxItems=10),
                "pinned": _boolean(),
            },
            ("content",),
        ),
        request="Note down: renew passport before October.",
        examples=(
            {"title": "Reminder", "content": "Renew passport before October.", "pinned": True},
            {"content": "Try the ramen place on Oranienstr.", "tags": ["food"]},
        ),
        result='{"note_id": "n_412"}',
        strict=False,
    ),
    _tool(
        "todo.add_task",
        "Add a task to a to-do list.",
        _object(
            {
                "title": _string(minLength=1, maxLength=500),
                "list": _string(default="Inbox"),
                "due": _nullable(_string(format="date-time")),
                "priority": _integer("1 = highest", minimum=1, maximum=4),
                "subtasks": _array(_string(minLength=1), maxItems=25),
            },
            ("title",),
        ),
        request="Remind me to call the dentist Friday at 9.",
        examples=(
            {"title": "Call the dentist", "due": "2025-07-18T09:00:00+02:00", "priority": 2},
            {"title": "Plan offsite", "list": "Work", "subtasks": ["Venue", "Agenda", "Budget"]},
        ),
        result='{"task_id": "t_9001"}',
    ),
    _tool(
        "translate.text",
        "Translate text between languages.",
        _object(
            {
                "text": _string(minLength=1, maxLength=5000),
                "source_lang": _nullable(
                    _string(pattern=r"^[a-z]{2}(-[A-Z]{2})?$"), "null to auto-detect"
                ),
                "target_lang": _string(pattern=r"^[a-z]{2}(-[A-Z]{2})?$"),
                "formality": _enum(("default", "more", "less")),
            },
            ("text", "target_lang"),
        ),
        request="Translate 'Where is the train station?' into Japanese.",
        examples=(
            {"text": "Where is the train station?", "source_lang": None, "target_lang": "ja"},
            {
                "text": "Vielen Dank für Ihre Geduld.",
                "source_lang": "de",
                "target_lang": "en-GB",
                "formality": "more",
            },
        ),
        result='{"translation": "駅はどこですか？"}',
        strict=False,
    ),
    _tool(
        "calculator",
        "Evaluate an arithmetic expression exactly.",
        _object(
            {
                "expression": _string(minLength=1, maxLength=1000),
                "precision": _integer("Significant digits", minimum=1, maximum=50),
            },
            ("expression",),
        ),
        request="What's 17.5% of 2,340?",
        examples=({"expression": "0.175 * 2340"}, {"expression": "sqrt(2)", "precision": 30}),
        result="409.5",
        strict=False,
    ),
    # -- infrastructure and network
    _tool(
        "dns.lookup",
        "Resolve DNS records for a host name.",
        _object(
            {
                "hostname": _string(format="hostname"),
                "record_type": _enum(("A", "AAAA", "CNAME", "MX", "TXT", "NS")),
                "resolver": _string("Resolver to query", format="ipv4"),
            },
            ("hostname", "record_type"),
            closed=True,
        ),
        request="What are the MX records for example.com?",
        examples=(
            {"hostname": "example.com", "record_type": "MX"},
            {"hostname": "api.example.org", "record_type": "A", "resolver": "1.1.1.1"},
        ),
        result='["10 mx1.example.com.", "20 mx2.example.com."]',
    ),
    _tool(
        "net.ping",
        "Send ICMP echo requests to a host.",
        _object(
            {
                "host": {
                    "anyOf": [_string(format="ipv4"), _string(format="hostname")],
                    "description": "IPv4 address or host name",
                },
                "count": _integer(minimum=1, maximum=20, default=4),
                "timeout_seconds": _number(exclusiveMinimum=0, maximum=30),
            },
            ("host",),
            closed=True,
        ),
        request="Is 10.0.3.7 reachable from here?",
        examples=(
            {"host": "10.0.3.7", "count": 3},
            {"host": "db-2.internal.example.com", "timeout_seconds": 0.5},
        ),
        result="3 packets transmitted, 0 received, 100% packet loss",
    ),
    _tool(
        "storage.upload",
        "Upload a local file to an object-storage bucket.",
        _object(
            {
                "bucket": _string(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"),
                "key": _string(minLength=1, maxLength=1024),
                "local_path": _PATH,
                "content_type": _string(pattern=r"^[a-z]+/[a-z0-9.+-]+$"),
                "acl": _enum(("private", "public-read")),
                "expires_at": _nullable(_string(format="date-time")),
            },
            ("bucket", "key", "local_path"),
            closed=True,
        ),
        request="Upload reports/q2.pdf to the acme-reports bucket as 2025/q2.pdf.",
        examples=(
            {"bucket": "acme-reports", "key": "2025/q2.pdf", "local_path": "reports/q2.pdf"},
            {
                "bucket": "static.example.com",
                "key": "img/logo.svg",
                "local_path": "/tmp/logo.svg",
                "content_type": "image/svg+xml",
                "acl": "public-read",
                "expires_at": None,
            },
        ),
        result='{"url": "s3://acme-reports/2025/q2.pdf", "etag": "9b2cf535f27731c9"}',
    ),
    _tool(
        "vector_store.search",
        "Semantic search over the company knowledge base.",
        _object(
            {
                "query": _string(minLength=1, maxLength=2000),
                "top_k": _integer(minimum=1, maximum=50, default=8),
                "filters": _object(
                    {
                        "source": _array(
                            _enum(("confluence", "gdrive", "slack", "github")), maxItems=4
                        ),
                        "updated_after": _string(format="date"),
                        "author": _string(format="email"),
                    },
                ),
                "min_score": _number(minimum=0, maximum=1),
            },
            ("query",),
        ),
        request="What's our policy on expensing home-office equipment?",
        examples=(
            {"query": "home office equipment expense policy", "top_k": 5},
            {
                "query": "on-call handbook",
                "filters": {"source": ["confluence", "github"], "updated_after": "2025-01-01"},
                "min_score": 0.35,
            },
        ),
        result='[{"title": "Expense policy 2025", "score": 0.82, "source": "confluence"}]',
    ),
    _tool(
        "crm.contacts.upsert",
        "Create or update a CRM contact, matched by email.",
        _object(
            {
                "email": _string(format="email"),
                "first_name": _string(maxLength=100),
                "last_name": _string(maxLength=100),
                "phone": _string(pattern=r"^\+[1-9][0-9]{6,14}$"),
                "company": _object(
                    {
                        "name": _string(),
                        "domain": _string(format="hostname"),
                        "size": _enum(("1-10", "11-50", "51-200", "201-1000", "1000+")),
                    },
                    ("name",),
                ),
                "lifecycle_stage": _enum(("lead", "opportunity", "customer", "churned")),
                "owner_id": _string(format="uuid"),
            },
            ("email",),
        ),
        request="Add jane.doe@globex.example from Globex to the CRM as a lead.",
        examples=(
            {
                "email": "jane.doe@globex.example",
                "company": {"name": "Globex", "domain": "globex.example"},
                "lifecycle_stage": "lead",
            },
            {
                "email": "li.wei@example.org",
                "first_name": "Li",
                "last_name": "Wei",
                "phone": "+8613800138000",
                "owner_id": "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
            },
        ),
        result='{"contact_id": 77120, "created": true}',
    ),
    _tool(
        "monitoring.query_metrics",
        "Run a PromQL range query.",
        _object(
            {
                "query": _string(minLength=1, maxLength=2000),
                "start": _string(format="date-time"),
                "end": _string(format="date-time"),
                "step_seconds": _integer(minimum=1, maximum=86400),
            },
            ("query", "start", "end"),
            closed=True,
        ),
        request="Plot the p99 latency of the API over the last hour.",
        examples=(
            {
                "query": "histogram_quantile(0.99, rate(http_request_seconds_bucket[5m]))",
                "start": "2025-07-14T08:30:00Z",
                "end": "2025-07-14T09:30:00Z",
                "step_seconds": 60,
            },
        ),
        result='{"series": [{"values": [[1752481800, "0.412"], [1752481860, "0.398"]]}]}',
    ),
)

TOOLS: dict[str, dict[str, Any]] = {tool.name: tool.declaration for tool in _LIBRARY}


# ---- request generation ------------------------------------------------------------------------


def _rank(case_index: int, tool_name: str) -> str:
    """A seeded, run-independent pseudo-random sort key for ``tool_name`` within one case."""
    return hashlib.sha256(f"{CORPUS_SEED}:{case_index}:{tool_name}".encode()).hexdigest()


def _history(tool: _LibraryTool) -> list[dict[str, Any]]:
    """An earlier assistant turn that already called ``tool``, and the tool's answer."""
    call_id = f"functions.{tool.name}:0"
    arguments = json.dumps(tool.examples[0], ensure_ascii=False)
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": tool.name, "arguments": arguments},
    }
    return [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": tool.result},
    ]


def _case(index: int) -> CorpusCase:
    """Case ``index``: a focus tool (cycling through the library) whose request the user makes,
    plus a seeded sample of other tools up to the cycle's tool count."""
    focus = _LIBRARY[index % len(_LIBRARY)]
    tool_count = TOOL_COUNT_CYCLE[index % len(TOOL_COUNT_CYCLE)]
    others = sorted((t for t in _LIBRARY if t is not focus), key=lambda t: _rank(index, t.name))
    chosen = sorted([focus, *others[: tool_count - 1]], key=lambda t: _rank(index, t.name))

    messages: list[dict[str, Any]] = []
    system_prompt = SYSTEM_PROMPTS[index % len(SYSTEM_PROMPTS)]
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": focus.request})
    with_history = index % HISTORY_PERIOD == HISTORY_PERIOD - 1
    if with_history:
        messages.extend(_history(focus))

    # Golden calls: every example of the focus tool, then the first of up to two others.
    example_calls = [(focus.name, arguments) for arguments in focus.examples]
    example_calls += [(tool.name, tool.examples[0]) for tool in others[: min(2, tool_count - 1)]]
    name = f"{index:03d}-{focus.name}-{tool_count}-tools" + ("-history" if with_history else "")
    return CorpusCase(
        name=name,
        tools=copy.deepcopy([tool.declaration for tool in chosen]),
        messages=messages,
        example_calls=copy.deepcopy(example_calls),
    )


def corpus() -> list[CorpusCase]:
    """The full corpus (CORPUS_SIZE cases), identical on every call and every run; each call
    returns fresh copies, so callers may mutate what they get."""
    return [_case(index) for index in range(CORPUS_SIZE)]
