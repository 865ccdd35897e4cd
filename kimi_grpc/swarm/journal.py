"""The run journal: every finished step of every sub-agent, appended as JSON lines and fsync'd.

A step is *finished* once its record is on disk: the model's turn, the tool results and the usage.
Resuming replays the journal into :class:`RunState` and continues after the last finished step of
each sub-agent, so no finished step is ever redone (a step cut by a crash — model called, tools
maybe run, record not yet written — is redone).

Records (``type``): ``run`` (task, run id, config) · ``plan`` (sub-tasks) · ``step`` (agent, step,
assistant message, tool results, usage, retries) · ``agent_done`` (agent, outcome, result, error) ·
``synthesis`` (answer) · ``run_done``.

Appends go through one writer thread that group-commits: it writes every record queued so far,
fsyncs once, then releases their waiters. Each ``await append(...)`` returns only when its record
is durable, yet 300 sub-agents finishing at once cost a handful of fsyncs, not 300, and the event
loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOURNAL_FILE = "journal.jsonl"


class Journal:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / JOURNAL_FILE
        run_dir.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_loop, name="swarm-journal", daemon=True)
        self._thread.start()
        self.fsyncs = 0

    async def append(self, record: dict[str, Any]) -> None:
        """Returns once ``record`` is written and fsync'd."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        self._queue.put((line, loop, done))
        await done

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._file.close()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    self._commit(batch)
                    return
                batch.append(nxt)
            self._commit(batch)

    def _commit(self, batch: list) -> None:
        error: BaseException | None = None
        try:
            self._file.write(b"".join(line for line, _, _ in batch))
            self._file.flush()
            os.fsync(self._file.fileno())
            self.fsyncs += 1
        except OSError as exc:  # disk full, ...: every waiter learns the record is not durable
            error = exc
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
        for _, loop, done in batch:
            by_loop.setdefault(loop, []).append(done)
        for loop, futures in by_loop.items():  # one wake-up per loop per commit
            loop.call_soon_threadsafe(_settle, futures, error)


def _settle(futures: list[asyncio.Future], error: BaseException | None) -> None:
    for done in futures:
        if done.cancelled():
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


def _drop_torn_tail(path: Path) -> None:
    """A crash mid-write can leave a partial last line: cut the file back to its last newline."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / JOURNAL_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line: everything before it is intact
    return records


@dataclass
class AgentState:
    index: int
    subtask: str
    steps: list[dict[str, Any]] = field(default_factory=list)  # step records, in order
    outcome: str | None = None  # "done" | "failed" | "budget" | "max_steps" | "deadline"
    result: str = ""
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.outcome is not None


@dataclass
class RunState:
    run_id: str = ""
    task: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    subtasks: list[str] | None = None
    agents: list[AgentState] = field(default_factory=list)
    answer: str | None = None
    done: bool = False

    @property
    def steps_used(self) -> int:
        return sum(len(a.steps) for a in self.agents)

    def apply(self, record: dict[str, Any]) -> None:
        kind = record["type"]
        if kind == "run":
            self.run_id, self.task, self.config = record["run_id"], record["task"], record["config"]
        elif kind == "plan":
            self.subtasks = list(record["subtasks"])
            self.agents = [AgentState(i, t) for i, t in enumerate(self.subtasks)]
        elif kind == "step":
            agent = self.agents[record["agent"]]
            if record["step"] != len(agent.steps) + 1:
                raise ValueError(
                    f"journal: agent {record['agent']} step {record['step']} out of order "
                    f"(have {len(agent.steps)})"
                )
            agent.steps.append(record)
        elif kind == "agent_done":
            agent = self.agents[record["agent"]]
            agent.outcome = record["outcome"]
            agent.result, agent.error = record.get("result", ""), record.get("error", "")
        elif kind == "synthesis":
            self.answer = record["answer"]
        elif kind == "run_done":
            self.done = True

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        state = cls()
        for record in read_records(run_dir):
            state.apply(record)
        return state
