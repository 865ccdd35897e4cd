"""The host KV tier through a real server: flags, GetServerStatus.kv_tiers, retention of a
session whose AgentStep did not end in an answer, and no leaked pages."""

from __future__ import annotations

import time

from kimi_grpc.client import KimiClient
from tests.server_harness import running_server

LONG = "Check the inventory, then reconcile every line item against the ledger. " * 12


def test_host_tier_status_and_session_retention() -> None:
    with (
        running_server(
            *("--kv-cache-memory", str(640_000), "--host-kv-cache-memory", str(4_000_000)),
            *("--max-model-len", "512", "--kv-retention-seconds", "60"),
        ) as srv,
        KimiClient(srv.target) as client,
    ):
        status = client.server_status()
        assert status.kv_tiers.host_pages_total > 0 and status.kv_tiers.host_pages_used == 0
        params = {"max_tokens": 4, "temperature": 0}
        # A sub-agent's step that stops at max_tokens: its session's pages are retained.
        step = client.agent_step_result(
            [{"role": "user", "content": LONG}], mode="instant", params=params, session_id="s1"
        )
        assert step.final.usage.prompt_tokens > 64
        for i in range(6):  # other traffic pushes s1's pages off the device
            client.agent_step_result(
                [{"role": "user", "content": f"{i} {LONG[i:]}"}], mode="instant", params=params
            )
        deadline = time.monotonic() + 10
        while client.server_status().running and time.monotonic() < deadline:
            time.sleep(0.05)
        tiers = client.server_status().kv_tiers
        assert tiers.saved_pages > 0 and tiers.bytes_saved > 0
        assert tiers.host_pages_retained > 0
        again = client.agent_step_result(
            [{"role": "user", "content": LONG}], mode="instant", params=params, session_id="s1"
        )
        assert again.token_ids == step.token_ids
        assert again.final.usage.cached_tokens >= 64
        assert client.server_status().kv_tiers.host_hit_pages > 0
        assert client.server_status().kv_pages_used == 0
