"""Sampler: greedy, temperature, top-k / top-p / min-p, penalties (vLLM semantics), logit_bias,
min_tokens, logprobs, and batch-independence of seeded draws."""

from __future__ import annotations

import math

import pytest
import torch

from kimi_grpc.engine.sampler import (
    Sampler,
    SamplingState,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    make_generator,
)
from kimi_grpc.sampling_params import SamplingParams

CPU = torch.device("cpu")
NEG_INF = float("-inf")


def state(prompt=(0,), output=(), stops=(), seed=None, **params) -> SamplingState:
    p = SamplingParams(seed=seed, **params)
    return SamplingState(p, list(prompt), list(output), frozenset(stops), make_generator(seed, CPU))


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()[None]


def draw_counts(probs: list[float], n: int = 20_000, **params) -> torch.Tensor:
    """Token frequencies of n draws (one call, n rows sharing a seeded sampler stream)."""
    st = state(**params)
    logits = logits_of(probs).expand(n, -1).contiguous()
    sampler = Sampler(torch.Generator().manual_seed(1234))
    ids = [r.token_id for r in sampler.sample(logits, [st] * n)]
    return torch.bincount(torch.tensor(ids), minlength=len(probs)).float() / n


# ---- greedy -------------------------------------------------------------------------------------


def test_greedy_is_argmax_lowest_id_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[2, [7, 3, 40]] = 10.0  # three-way tie -> 3
    states = [state(temperature=t) for t in (0.0, 0, 1e-6, 0.0, 0.0, 9e-6)]
    results = Sampler().sample(logits, states)
    expected = logits.argmax(dim=-1).tolist()
    assert expected[2] == 3
    assert [r.token_id for r in results] == expected
    assert all(r.logprob is None and r.top_logprobs is None for r in results)


def test_greedy_rows_mixed_with_sampled_rows():
    torch.manual_seed(1)
    logits = torch.randn(5, 30)
    states = [state(temperature=0.0 if b % 2 == 0 else 1.0, seed=b) for b in range(5)]
    results = Sampler().sample(logits, states)
    for b in (0, 2, 4):
        assert results[b].token_id == int(logits[b].argmax())
    assert all(0 <= r.token_id < 30 for r in results)


def test_low_temperature_approaches_greedy():
    torch.manual_seed(2)
    logits = torch.randn(64, 100)
    states = [state(temperature=1e-3, seed=s) for s in range(64)]
    ids = [r.token_id for r in Sampler().sample(logits, states)]
    assert ids == logits.argmax(dim=-1).tolist()
    # At temperature 1 the same rows are far from all-argmax.
    states = [state(temperature=1.0, seed=s) for s in range(64)]
    ids = [r.token_id for r in Sampler().sample(logits, states)]
    assert ids != logits.argmax(dim=-1).tolist()


def test_temperature_sharpens_the_distribution():
    probs = [0.5, 0.3, 0.15, 0.05]
    freq = draw_counts(probs, temperature=2.0)
    expected = torch.tensor(probs).sqrt()
    assert torch.allclose(freq, expected / expected.sum(), atol=0.015)
    freq = draw_counts(probs, temperature=1.0)
    assert torch.allclose(freq, torch.tensor(probs), atol=0.015)


# ---- filters ------------------------------------------------------------------------------------


def kept(masked: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in masked]


def test_top_k_top_p_helper_keeps_exactly_the_right_sets():
    logits = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]] * 5)
    masked = apply_top_k_top_p(logits, [2, 0, -1, 5, 1], [1.0] * 5)
    assert kept(masked) == [{0, 2}, set(range(5)), set(range(5)), set(range(5)), {0}]
    assert torch.equal(masked[0, [0, 2]], logits[0, [0, 2]])  # survivors untouched

    # top-p on probs [0.5, 0.3, 0.15, 0.05]: mass before each = 0, .5, .8, .95.
    probs = logits_of([0.5, 0.3, 0.15, 0.05]).expand(4, -1)
    masked = apply_top_k_top_p(probs, [0] * 4, [0.4, 0.75, 0.85, 0.99])
    assert kept(masked) == [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}]
    # top-k first, then top-p over the renormalised survivors: k=3 -> [.526, .316, .158].
    masked = apply_top_k_top_p(probs[:1], [3], [0.83])
    assert kept(masked) == [{0, 1}]
    masked = apply_top_k_top_p(probs[:1], [3], [0.85])
    assert kept(masked) == [{0, 1, 2}]


def test_top_p_boundary_and_ties():
    """Mass exactly reaching p stops the set; equal logits are kept lowest id first."""
    masked = apply_top_k_top_p(torch.zeros(2, 8), [0, 3], [0.5, 1.0])
    assert kept(masked) == [{0, 1, 2, 3}, set(range(8))]  # 4 x 0.125 = 0.5; top-k keeps ties
    masked = apply_top_k_top_p(torch.zeros(1, 4), [0], [0.5])
    assert kept(masked) == [{0, 1}]


def test_top_p_on_shuffled_vocabulary():
    gen = torch.Generator().manual_seed(3)
    probs = torch.rand(1, 200, generator=gen) + 0.01
    probs /= probs.sum()
    masked = apply_top_k_top_p(probs.log(), [0], [0.6])
    order = probs[0].argsort(descending=True)
    before = probs[0][order].cumsum(0) - probs[0][order]
    expected = set(order[before < 0.6].tolist())
    assert kept(masked)[0] == expected
    assert 0.6 <= probs[0, list(expected)].sum() < 0.6 + probs[0].max()


def test_min_p_helper():
    logits = logits_of([0.5, 0.3, 0.15, 0.05]).expand(3, -1)
    masked = apply_min_p(logits, [0.0, 0.5, 0.2])
    # thresholds: 0 -> all, 0.25 -> {.5, .3}, 0.1 -> {.5, .3, .15}
    assert kept(masked) == [{0, 1, 2, 3}, {0, 1}, {0, 1, 2}]
    assert kept(apply_min_p(torch.zeros(1, 4), [1.0])) == [{0, 1, 2, 3}]  # all equal the max


@pytest.mark.parametrize(
    ("params", "support", "expected"),
    [
        ({"top_k": 2}, {0, 1}, [0.625, 0.375, 0, 0]),
        ({"top_p": 0.75}, {0, 1}, [0.625, 0.375, 0, 0]),
        ({"top_p": 0.85}, {0, 1, 2}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        ({"min_p": 0.5}, {0, 1}, [0.625, 0.375, 0, 0]),
        ({"min_p": 0.2}, {0, 1, 2}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        ({"top_k": 3, "min_p": 0.5}, {0, 1}, [0.625, 0.375, 0, 0]),
    ],
)
def test_draws_come_from_the_filtered_renormalised_distribution(params, support, expected):
    freq = draw_counts([0.5, 0.3, 0.15, 0.05], **params)
    assert set(freq.nonzero().flatten().tolist()) == support
    assert torch.allclose(freq, torch.tensor(expected), atol=0.015)


# ---- penalties, bias, min_tokens ----------------------------------------------------------------


def test_repetition_penalty_matches_hand_computation():
    raw = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    st = state(prompt=[0, 4], output=[1, 1], repetition_penalty=2.0)
    out = Sampler.process_logits(raw, [st])
    # seen: 0 (prompt), 4 (prompt), 1 (output): positive / 2, negative * 2.
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, -4.0, 1.0]]
    assert raw.tolist() == [[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]]  # input untouched
    st = state(prompt=[0, 4], output=[1], repetition_penalty=0.5)
    assert Sampler.process_logits(raw, [st]).tolist() == [[4.0, -0.5, 0.5, 3.0, -1.0, 1.0]]


def test_frequency_and_presence_penalties_count_output_only():
    raw = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    st = state(prompt=[3, 3, 3], output=[0, 0, 0, 2], frequency_penalty=0.5, presence_penalty=0.25)
    out = Sampler.process_logits(raw, [st])
    # token 0: 1 - 0.5*3 - 0.25 = -0.75; token 2: 1 - 0.5 - 0.25 = 0.25; prompt token 3 untouched.
    assert torch.allclose(out, torch.tensor([[-0.75, 1.0, 0.25, 1.0]]))
    st = state(prompt=[3], output=[1, 1], frequency_penalty=-1.0, presence_penalty=-2.0)
    assert torch.allclose(Sampler.process_logits(raw, [st]), torch.tensor([[1.0, 5.0, 1.0, 1.0]]))


def test_all_penalties_together_against_reference_loop():
    gen = torch.Generator().manual_seed(4)
    raw = torch.randn(4, 40, generator=gen)
    states = []
    for b in range(4):
        prompt = torch.randint(0, 40, (15,), generator=gen).tolist()
        output = torch.randint(0, 40, (25,), generator=gen).tolist()
        rep, freq, pres = (1.0, 0.0, 0.0) if b == 2 else (1.3 + 0.1 * b, 0.2 * b, 0.7 - 0.3 * b)
        states.append(
            state(prompt, output, repetition_penalty=rep, frequency_penalty=freq,
                  presence_penalty=pres)
        )  # fmt: skip
    out = Sampler.process_logits(raw, states)
    for b, st in enumerate(states):
        p = st.params
        for v in range(40):
            x = raw[b, v].item()
            count = st.output_token_ids.count(v)
            if v in st.prompt_token_ids or count:
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            x -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
            assert math.isclose(out[b, v].item(), x, rel_tol=1e-6, abs_tol=1e-6), (b, v)
    # The helper directly, and the cached output tensor tracks appended tokens.
    states[0].output_token_ids.extend([5, 5])
    again = Sampler.process_logits(raw, states)
    counts = torch.bincount(torch.tensor(states[0].output_token_ids), minlength=40)[None]
    mask = torch.bincount(torch.tensor(states[0].prompt_token_ids), minlength=40)[None] > 0
    p = states[0].params
    ref = apply_penalties(
        raw[:1],
        mask,
        counts,
        torch.tensor([p.repetition_penalty]),
        torch.tensor([p.frequency_penalty]),
        torch.tensor([p.presence_penalty]),
    )
    assert torch.allclose(again[:1], ref) and not torch.allclose(again[:1], out[:1])


def test_logit_bias_is_added_and_changes_greedy_choice():
    raw = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0]])
    states = [state(temperature=0, logit_bias={1: 2.5, 0: -0.5}), state(temperature=0)]
    out = Sampler.process_logits(raw, states)
    assert out.tolist() == [[2.5, 3.5, 2.0], [3.0, 1.0, 2.0]]
    assert [r.token_id for r in Sampler().sample(raw, states)] == [1, 0]
    banned = state(temperature=1.0, seed=0, logit_bias={0: -100})
    ids = {Sampler().sample(raw[:1], [banned])[0].token_id for _ in range(200)}
    assert 0 not in ids


def test_min_tokens_suppresses_stop_ids_then_releases():
    raw = torch.tensor([[0.0, 5.0, 4.0, 1.0]])  # 1 is the eos and the argmax
    st = state(temperature=0, stops={1, 3}, min_tokens=2, max_tokens=10)
    sampler = Sampler()
    masked = Sampler.process_logits(raw, [st])
    assert masked.tolist() == [[0.0, NEG_INF, 4.0, NEG_INF]]
    assert sampler.sample(raw, [st])[0].token_id == 2
    st.output_token_ids.append(2)
    assert sampler.sample(raw, [st])[0].token_id == 2
    st.output_token_ids.append(2)  # min_tokens reached: eos allowed again
    assert Sampler.process_logits(raw, [st]).tolist() == raw.tolist()
    assert sampler.sample(raw, [st])[0].token_id == 1


def test_out_of_vocabulary_ids_fail_readably():
    raw = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="logit_bias"):
        Sampler().sample(raw, [state(logit_bias={9: 1.0})])
    with pytest.raises(ValueError, match="stop_token_ids"):
        Sampler().sample(raw, [state(stops={9}, min_tokens=1)])


# ---- logprobs -----------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_sorted_top():
    gen = torch.Generator().manual_seed(5)
    raw = torch.randn(4, 64, generator=gen) * 3
    states = [
        state(logprobs=5, temperature=0.7, seed=1, repetition_penalty=1.8, output=[3]),
        state(logprobs=0, temperature=0, logit_bias={7: 50.0}),
        state(),  # logprobs off
        state(logprobs=20, top_k=3, seed=2),
    ]
    results = Sampler().sample(raw, states)
    reference = torch.log_softmax(raw, dim=-1)
    assert results[1].token_id == 7  # the bias decided, but logprobs stay raw
    for b in (0, 1, 3):
        r = results[b]
        assert math.isclose(r.logprob, reference[b, r.token_id].item(), abs_tol=1e-5)
    assert results[2].logprob is None and results[2].top_logprobs is None
    assert results[1].top_logprobs == []
    for b, k in ((0, 5), (3, 20)):
        top = results[b].top_logprobs
        assert len(top) == k
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        expected = torch.topk(reference[b], k)
        assert [i for i, _ in top] == expected.indices.tolist()
        assert torch.allclose(torch.tensor(values), expected.values, atol=1e-6)


# ---- seeds and batches --------------------------------------------------------------------------

SEEDED = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "min_p": 0.01, "frequency_penalty": 0.3}


def run_steps(sampler, rows_logits, make_states, steps=12):
    """Runs ``steps`` steps over fixed per-row logits, appending each draw; returns outputs."""
    states = make_states()
    for step in range(steps):
        logits = torch.stack([fn(step) for fn in rows_logits])
        for st, r in zip(states, sampler.sample(logits, states), strict=True):
            st.output_token_ids.append(r.token_id)
    return [st.output_token_ids for st in states]


def row_logits(seed: int, vocab: int = 500):
    base = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2
    return lambda step: base + 0.1 * step * torch.cos(torch.arange(vocab) * (seed + 1))


def test_seeded_rows_do_not_depend_on_their_batch():
    a, b = row_logits(100), row_logits(200)
    alone_a = run_steps(Sampler(), [a], lambda: [state(seed=11, **SEEDED)])[0]
    alone_b = run_steps(Sampler(), [b], lambda: [state(seed=22, temperature=1.2)])[0]

    others = [row_logits(s) for s in range(6)]

    def batch_states(order):
        def make():
            rows = {
                "a": state(seed=11, **SEEDED),
                "b": state(seed=22, temperature=1.2),
                **{f"o{i}": state(seed=(None if i % 2 else 1000 + i), top_p=0.9) for i in range(6)},
            }
            return [rows[name] for name in order]

        return make

    logits = {"a": a, "b": b, **{f"o{i}": others[i] for i in range(6)}}
    for order in (
        ["a", "o0", "o1", "b", "o2", "o3", "o4", "o5"],
        ["o5", "o4", "b", "o3", "o2", "o1", "o0", "a"],
        ["o1", "a", "o3", "o0", "b", "o2", "o5", "o4"],
    ):
        # An unseeded stream that is consumed differently in every batch.
        sampler = Sampler(torch.Generator().manual_seed(len(order[0]) + order.index("a")))
        outs = run_steps(sampler, [logits[n] for n in order], batch_states(order))
        assert outs[order.index("a")] == alone_a
        assert outs[order.index("b")] == alone_b


def test_same_seed_reproduces_and_different_seeds_differ():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(6))

    def draws(seed):
        st = state(seed=seed)
        return [Sampler().sample(logits, [st])[0].token_id for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_rows_sharing_one_generator_draw_from_one_stream():
    """The engine may give every unseeded row the same engine generator (or None = the
    sampler's): reseeding it reproduces the whole batch; rows differ and steps advance it."""
    logits = torch.zeros(6, 10_000)  # uniform: equal draws would be a coincidence
    shared = torch.Generator().manual_seed(3)
    states = [state() for _ in range(6)]
    for st in states[:4]:
        st.generator = shared
    sampler = Sampler(torch.Generator().manual_seed(3))

    def step():
        return [r.token_id for r in sampler.sample(logits, states)]

    first, second = step(), step()
    shared.manual_seed(3)
    sampler.generator.manual_seed(3)
    assert step() == first and first != second
    assert len(set(first[:4])) == 4 and first[4] != first[5]


def test_create_fills_stop_ids_and_generator():
    p = SamplingParams(stop_token_ids=[5], seed=3)
    st = SamplingState.create(p, [1, 2], (0, 9), CPU)
    assert st.stop_token_ids == frozenset({0, 5, 9}) and st.generator is not None
    st = SamplingState.create(SamplingParams(stop_token_ids=[5], ignore_eos=True), [1], (0,), CPU)
    assert st.stop_token_ids == frozenset({5}) and st.generator is None
    assert make_generator(None, CPU) is None
    a, b = make_generator(4, CPU), make_generator(4, CPU)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def test_large_batch_is_vectorised_and_valid():
    """A serving-sized step (64 rows, 32k vocab) of mixed settings: valid ids, greedy = argmax."""
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(64, 32_768, generator=gen)
    kinds = [
        {"temperature": 0.0},
        {"temperature": 0.8, "top_p": 0.9},
        {"temperature": 1.0, "top_k": 50},
        {"temperature": 0.6, "min_p": 0.05, "repetition_penalty": 1.1},
    ]
    states = [
        state(prompt=list(range(b, 2000, 7)), output=[b, b + 1], seed=b if b % 3 else None,
              **kinds[b % 4])
        for b in range(64)
    ]  # fmt: skip
    before = logits.clone()
    results = Sampler().sample(logits, states)
    assert torch.equal(logits, before)  # the caller's logits are never modified
    for b, r in enumerate(results):
        assert 0 <= r.token_id < 32_768
        if b % 4 == 0:
            assert r.token_id == int(logits[b].argmax())
        if b % 4 == 2:
            assert r.token_id in set(torch.topk(logits[b], 50).indices.tolist())
