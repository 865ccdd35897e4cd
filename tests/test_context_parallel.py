"""Decode context parallelism (issue 17): each token's latent on one rank of a DCP group, the
partial attentions merged by their log-sum-exp; N processes give one process's tokens."""

from __future__ import annotations

import random

import pytest
import torch
from hf_reference import VARIANTS, build
from test_kv_host_tier import GREEDY as AGENT_GREEDY
from test_kv_host_tier import PAGE, agent_prompts

from kimi_grpc import LLM, SamplingParams, ops
from kimi_grpc.checkpoint_maker import demo_checkpoint
from kimi_grpc.config import load_model_config
from kimi_grpc.model.context_parallel import local_length, local_slot, merge_partials
from kimi_grpc.model.forward_batch import ForwardBatch
from kimi_grpc.model.kv_cache import LatentKVCache

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# Small steps force chunked prefill next to decodes: both attention paths run sharded.
ENGINE = dict(kv_cache_memory=8 * 1024**2, max_num_batched_tokens=24, dtype="float32")


def prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(0, 1792) for _ in range(n)] for n in (5, 40, 1, 17, 70)]


def generate(path, tp: int = 1, dcp: int = 1) -> list[list[int]]:
    with LLM(str(path), tensor_parallel_size=tp, decode_context_parallel_size=dcp, **ENGINE) as llm:
        return [out.token_ids for out in llm.generate(prompts(), GREEDY)]


def test_slots_place_every_position_once_on_its_owner() -> None:
    """Position p lives on DCP rank p % N; within a rank the positions fill its pages in order."""
    page_size, n, table = 4, 3, [7, 2, 5]  # blocks of 12 tokens
    for rank in range(n):
        owned = [p for p in range(36) if p % n == rank]
        slots = [local_slot(p, table, page_size, n) for p in owned]
        # Read in table order, the rank's slots hold its positions in ascending order.
        order = {page: i for i, page in enumerate(table)}
        assert sorted(slots, key=lambda s: (order[s // page_size], s % page_size)) == slots
        assert len(owned) == local_length(36, rank, n) == len(set(slots)) == 12
    assert [local_length(t, r, 3) for t in (0, 1, 2, 4) for r in range(3)] == [
        *(0, 0, 0),
        *(1, 0, 0),
        *(1, 1, 0),
        *(2, 1, 1),
    ]


def test_batch_keeps_only_the_owned_tokens() -> None:
    """A prefill of 5 after 3 cached tokens and a decode at position 8, DCP rank 1 of 2."""
    batch = ForwardBatch.build(
        [[10, 11, 12, 13, 14], [20]],
        [8, 9],
        [[0, 1], [2, 3]],
        page_size=4,
        device=torch.device("cpu"),
        dcp_rank=1,
        dcp_size=2,
    )
    assert batch.positions.tolist() == [3, 4, 5, 6, 7, 8]
    assert batch.kv_rows.tolist() == [0, 2, 4]  # positions 3, 5, 7 (the decode's 8 is rank 0's)
    assert batch.slot_mapping.tolist() == [1, 2, 3]  # local indices 1, 2, 3 of page 0
    assert batch.local_context_lens.tolist() == [4, 4] == batch.local_context_lens_host
    assert batch.local_decode_rows.tolist() == [0]
    one_token = ForwardBatch.build(
        [[5]], [1], [[0]], page_size=4, device=torch.device("cpu"), dcp_rank=1, dcp_size=2
    )
    assert one_token.local_decode_rows.numel() == 0  # rank 1 holds none of a 1-token context
    with pytest.raises(ValueError, match="dcp_rank=2 outside dcp_size=2"):
        ForwardBatch.build([[5]], [1], [[0]], 4, torch.device("cpu"), dcp_rank=2, dcp_size=2)


@pytest.mark.parametrize("dcp", [2, 4])
def test_merged_shares_equal_one_process_attention(dcp: int) -> None:
    """Every rank's mla_decode over its share, merged by LSE, equals the attention over the whole
    cache within 1e-5 (float32), including sequences some ranks hold no token of."""
    torch.manual_seed(0)
    heads, lora, rope, page_size = 4, 32, 16, 8
    lens = [1, 3, 17, 64, 101]
    full_pages = [-(-n // page_size) for n in lens]
    kv = torch.randn(sum(full_pages), page_size, lora + rope)
    q = torch.randn(len(lens), heads, lora + rope)
    full_table = torch.zeros(len(lens), max(full_pages), dtype=torch.int32)
    first = 0
    for b, n in enumerate(full_pages):
        full_table[b, :n] = torch.arange(first, first + n)
        first += n
    want_out, want_lse = ops.mla_decode(
        q, kv, full_table, torch.tensor(lens, dtype=torch.int32), softmax_scale=0.3,
        kv_lora_rank=lora,
    )  # fmt: skip

    # Shard: block b of sequence s is page id s * 16 + b; rank r's local page of that id holds
    # its positions of the block.
    outs, lses = [], []
    for rank in range(dcp):
        local = torch.zeros(len(lens) * 16, page_size, lora + rope)
        tables = torch.arange(len(lens) * 16, dtype=torch.int32).view(len(lens), 16)
        for s, n in enumerate(lens):
            flat = kv[full_table[s, : full_pages[s]].long()].reshape(-1, lora + rope)
            for p in range(rank, n, dcp):
                slot = local_slot(p, tables[s].tolist(), page_size, dcp)
                local.view(-1, lora + rope)[slot] = flat[p]
        local_lens = [local_length(n, rank, dcp) for n in lens]
        out = torch.zeros(len(lens), heads, lora)
        lse = torch.full((len(lens), heads), float("-inf"))
        rows = [s for s, n in enumerate(local_lens) if n]
        out[rows], lse[rows] = ops.mla_decode(
            q[rows], local, tables[rows], torch.tensor([local_lens[s] for s in rows],
            dtype=torch.int32), softmax_scale=0.3, kv_lora_rank=lora,
        )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    merged, lse = merge_partials(torch.stack(outs), torch.stack(lses))
    torch.testing.assert_close(merged, want_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def demo_tokens():
    return generate(demo_checkpoint())


@pytest.mark.parametrize(("tp", "dcp"), [(2, 2), (4, 2)], ids=["tp2-dcp2", "tp4-dcp2"])
def test_demo_dcp_matches_single_process(demo_tokens, tp: int, dcp: int) -> None:
    assert generate(demo_checkpoint(), tp, dcp) == demo_tokens


def test_transformers_checkpoint_dcp_matches_single_process(tmp_path) -> None:
    """A transformers-built DeepseekV3 checkpoint (4 heads): DCP=2 over TP=2 on gloo."""
    build(VARIANTS[1], tmp_path, seed=5)
    assert generate(tmp_path, 2, 2) == generate(tmp_path, 1)


def test_dcp_with_prefix_hits_preemption_and_host_tier() -> None:
    """The host-tier agent workload under TP=2 x DCP=2 with 8-token local pages (16-token blocks,
    the single-process run's page): shared-prefix hits, preemption in a 24-block pool and pages
    through the host tier give the single process's tokens; the group holds 2x the tokens."""
    config = load_model_config(demo_checkpoint())
    per_token = LatentKVCache.bytes_per_token(config, torch.float32)

    def run(tp: int, dcp: int, device_blocks: int, host_blocks: int) -> list[list[list[int]]]:
        local_page = PAGE // dcp
        with LLM(
            page_size=local_page,
            dtype="float32",
            kv_cache_memory=device_blocks * local_page * per_token,
            host_kv_cache_memory=host_blocks * local_page * per_token,
            max_model_len=256,
            tensor_parallel_size=tp,
            decode_context_parallel_size=dcp,
        ) as llm:
            engine = llm.engine
            outputs = [
                [o.outputs[0].token_ids for o in llm.generate(agent_prompts(r), AGENT_GREEDY)]
                for r in range(3)
            ]
            assert engine.blocks.page_size == PAGE and engine.blocks.num_pages == device_blocks
            if dcp > 1:
                assert engine.scheduler.num_preemptions > 0
                assert engine.blocks.tier_stats.host_hit_pages > 0
                assert engine.blocks.tier_stats.device_hit_pages > 0
                assert engine.blocks.num_used_pages == 0
            return outputs

    assert run(2, 2, device_blocks=24, host_blocks=256) == run(1, 1, 400, 0)
