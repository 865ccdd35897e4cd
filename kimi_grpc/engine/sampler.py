"""Batched sampling: one step's logits ``[B, V]`` for B running completions -> B next tokens.

Order (vLLM's): raw logprobs (when asked) -> guided-decoding masks (disallowed ids get -inf) ->
min_tokens (stop ids get -inf) -> logit_bias -> repetition / frequency / presence penalties ->
greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw. Logprobs are those of the raw
distribution, before any mask (vLLM's default "raw" logprobs). The sampler knows nothing about
scheduling: the engine keeps one :class:`SamplingState` per running completion, appends each
sampled token to its ``output_token_ids`` and decides when it finishes.

Seeded completions draw with their own ``torch.Generator`` (one per row, never a shared stream)
and every step of their filtering is row-local, so a seeded completion's tokens do not depend on
which batch it runs in. Rows whose ``generator`` is None draw from the sampler's generator (or
torch's default one); rows that share one generator object (an engine-wide stream for unseeded
requests) draw from it together in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kimi_grpc.guided import Guide, StepMasks, apply_masks
from kimi_grpc.sampling_params import GREEDY_TEMPERATURE, SamplingParams


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device`` (reproducible draws); None when unseeded."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class SamplingState:
    """One running completion, as far as sampling is concerned. The engine owns it: it appends
    each sampled token to ``output_token_ids`` (append-only; a new or shorter list is fine, it
    just resets the cache) and never changes ``prompt_token_ids`` once sampling began (cached).
    ``stop_token_ids`` is what min_tokens masks; finishing on a stop token is the engine's job."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)  # the engine appends
    # eos ids (unless params.ignore_eos) | params.stop_token_ids; masked while under min_tokens.
    stop_token_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None  # make_generator(seed, device)
    guide: Guide | None = None  # guided decoding: what this completion may sample next
    # Penalty caches, filled lazily by the sampler: the prompt's distinct ids (on the logits'
    # device) and a CPU copy of output_token_ids extended with the new tokens each step.
    _prompt_ids: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _output_buf: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _output_len: int = field(default=0, init=False, repr=False, compare=False)
    _output_src: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: list[int],
        eos_token_ids: tuple[int, ...] | list[int] | frozenset[int],
        device: torch.device | str,
        seed: int | None = None,
    ) -> SamplingState:
        """The usual construction: stop ids = eos (unless ignore_eos) | params.stop_token_ids, a
        generator from ``seed`` (default ``params.seed``; pass ``params.completion_seed(i)`` for
        completion i of n)."""
        stops = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= frozenset(eos_token_ids)
        seed = params.seed if seed is None else seed
        return cls(params, list(prompt_token_ids), [], stops, make_generator(seed, device))

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits or reads them: the next token is the raw
        argmax (min_tokens still masking stop ids, a bias, penalties, logprobs or a grammar
        all take the full path)."""
        p = self.params
        return (
            p.temperature < GREEDY_TEMPERATURE
            and p.logprobs is None
            and not p.logit_bias
            and not self.needs_penalties
            and self.guide is None
            and (len(self.output_token_ids) >= p.min_tokens or not self.stop_token_ids)
        )

    @property
    def needs_penalties(self) -> bool:
        p = self.params
        return (
            p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        )

    def prompt_ids_tensor(self, device: torch.device) -> torch.Tensor:
        """Distinct prompt ids, int64 ``[P']`` on ``device`` (computed once)."""
        if self._prompt_ids is None or self._prompt_ids.device != device:
            ids = torch.tensor(self.prompt_token_ids, dtype=torch.int64)
            self._prompt_ids = torch.unique(ids).to(device)
        return self._prompt_ids

    def output_ids_tensor(self) -> torch.Tensor:
        """``output_token_ids`` as a CPU int64 ``[O]`` view, extended incrementally."""
        out = self.output_token_ids
        if self._output_buf is None or out is not self._output_src or len(out) < self._output_len:
            self._output_src = out
            self._output_buf, self._output_len = (
                torch.empty(max(16, 2 * len(out)), dtype=torch.int64),
                0,
            )
        if len(out) > self._output_buf.numel():
            grown = torch.empty(2 * len(out), dtype=torch.int64)
            grown[: self._output_len] = self._output_buf[: self._output_len]
            self._output_buf = grown
        if len(out) > self._output_len:
            self._output_buf[self._output_len : len(out)] = torch.tensor(
                out[self._output_len :], dtype=torch.int64
            )
            self._output_len = len(out)
        return self._output_buf[: self._output_len]


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None  # log_softmax(raw logits)[token_id] when params.logprobs is not None
    top_logprobs: list[tuple[int, float]] | None  # params.logprobs best (id, logprob), descending


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties, out of place. logits: ``[R, V]`` f32; prompt_mask: ``[R, V]`` bool (id
    occurs in the prompt); output_counts: ``[R, V]`` int (occurrences in the output so far);
    repetition / frequency / presence: ``[R]`` f32.

    Repetition applies to ids seen in prompt or output (positive logits divided by it, others
    multiplied); frequency subtracts ``f * count`` and presence ``p * [count > 0]``, output only."""
    seen = prompt_mask | (output_counts > 0)
    rep = torch.where(seen, repetition[:, None], torch.ones_like(logits))
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    logits = logits - frequency[:, None] * output_counts.to(logits.dtype)
    return logits - presence[:, None] * (output_counts > 0).to(logits.dtype)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]
) -> torch.Tensor:
    """Masks (to -inf, out of place) what top-k and top-p drop. logits: ``[R, V]`` f32 (already
    divided by the temperature); top_k: R ints, ``<= 0`` or ``>= V`` = off; top_p: R floats, 1 =
    off. (Python sequences, so choosing the rows never waits for the device.)

    Top-k keeps the k largest logits (ties with the k-th are kept too). Top-p then keeps the
    smallest highest-probability set whose mass reaches p: a token is dropped when the mass of the
    tokens ranked above it already reaches p, so the best one is always kept. Only rows with a
    filter enabled are touched, so a row's result never depends on the other rows."""
    vocab = logits.shape[-1]
    rows = [i for i, k in enumerate(top_k) if 0 < k < vocab]
    if rows:
        sub, index = _select(logits, rows)
        k = torch.tensor([top_k[i] for i in rows], device=logits.device)
        kth = torch.topk(sub, max(top_k[i] for i in rows), dim=-1)
        kth = kth.values.gather(1, (k - 1)[:, None])
        logits = _merge(logits, index, sub.masked_fill(sub < kth, float("-inf")))
    rows = [i for i, p in enumerate(top_p) if p < 1.0]
    if rows:
        sub, index = _select(logits, rows)
        p = torch.tensor([top_p[i] for i in rows], dtype=torch.float32, device=logits.device)
        # Stable sort: equal logits keep id order, so the cut is the same in any batch.
        sorted_logits, order = torch.sort(sub, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = _merge(logits, index, sub.masked_fill(drop, float("-inf")))
    return logits


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Masks (out of place) tokens whose probability is below ``min_p * max probability``.
    logits: ``[R, V]`` f32; min_p: R floats, 0 = off."""
    rows = [i for i, m in enumerate(min_p) if m > 0]
    if not rows:
        return logits
    sub, index = _select(logits, rows)
    m = torch.tensor([min_p[i] for i in rows], dtype=torch.float32, device=logits.device)
    probs = torch.softmax(sub, dim=-1)
    drop = probs < m[:, None] * probs.max(dim=-1, keepdim=True).values
    return _merge(logits, index, sub.masked_fill(drop, float("-inf")))


def _select(x: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x[rows]`` (``rows`` ascending) and its index; ``x`` itself and None for every row."""
    if len(rows) == x.shape[0]:
        return x, None
    index = torch.tensor(rows, device=x.device)
    return x[index], index


def _merge(x: torch.Tensor, index: torch.Tensor | None, sub: torch.Tensor) -> torch.Tensor:
    """``x`` with the rows picked by :func:`_select` replaced by ``sub`` (out of place)."""
    return sub if index is None else x.index_copy(0, index, sub)


class Sampler:
    """Stateless apart from the generator unseeded rows draw from (``None`` = torch's default
    generator of the logits' device)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def sample(
        self,
        logits: torch.Tensor,
        states: list[SamplingState],
        masks: StepMasks | None = None,
        *,
        owned: bool = False,
    ) -> list[SampleResult]:
        """logits: ``[B, V]`` float32 (any float dtype is upcast), row b belongs to states[b];
        ``masks``: the guided rows' masks for this batch. Returns one result per row. ``logits``
        is not modified unless ``owned`` (the caller's private copy, which the masks may then
        overwrite instead of copying ``[B, V]`` floats)."""
        assert logits.dim() == 2 and logits.shape[0] == len(states), (logits.shape, len(states))
        batch = logits.shape[0]
        device = logits.device
        if batch == 0:
            return []
        if masks is None and all(s.plain_greedy for s in states):  # the common decode step
            return [SampleResult(t, None, None) for t in logits.argmax(dim=-1).tolist()]
        raw = logits.float()

        # Raw logprobs before anything alters the logits. lp_rows: [L]; raw_logprobs: [L, V].
        lp_rows = [b for b, s in enumerate(states) if s.params.logprobs is not None]
        raw_logprobs = torch.log_softmax(raw[lp_rows], dim=-1) if lp_rows else None

        # raw is private when the caller handed logits over or upcasting copied them; then the
        # masks and the processing below write into it instead of copying [B, V] floats again.
        private = owned or raw is not logits
        x = raw if masks is None else apply_masks(raw if private else raw.clone(), masks)
        x = self.process_logits(x, states, inplace=private or masks is not None)

        token_ids = torch.empty(batch, dtype=torch.int64, device=device)
        greedy = [b for b, s in enumerate(states) if s.params.temperature < GREEDY_TEMPERATURE]
        sampled = [b for b, s in enumerate(states) if s.params.temperature >= GREEDY_TEMPERATURE]
        if greedy:
            sub, index = _select(x, greedy)
            ids = sub.argmax(dim=-1)  # first maximum = lowest id among ties
            token_ids = ids if index is None else token_ids.index_copy(0, index, ids)
        if sampled:
            sub, index = _select(x, sampled)
            ids = self._draw(sub, [states[b] for b in sampled])
            token_ids = ids if index is None else token_ids.index_copy(0, index, ids)

        results = [SampleResult(t, None, None) for t in token_ids.tolist()]
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, token_ids[lp_rows][:, None]).squeeze(1).tolist()
            k_max = max(states[b].params.logprobs for b in lp_rows)
            if k_max > 0:
                top = torch.topk(raw_logprobs, k_max, dim=-1)
                top_values, top_ids = top.values.tolist(), top.indices.tolist()
            for i, b in enumerate(lp_rows):
                k = states[b].params.logprobs
                results[b].logprob = chosen[i]
                results[b].top_logprobs = (
                    list(zip(top_ids[i][:k], top_values[i][:k], strict=True)) if k else []
                )
        return results

    @staticmethod
    def process_logits(
        raw: torch.Tensor, states: list[SamplingState], *, inplace: bool = False
    ) -> torch.Tensor:
        """The logits greedy decoding and the draw see: ``raw`` with min_tokens, logit_bias and
        penalties applied. raw: ``[B, V]`` f32 (not modified unless ``inplace``; returned as is
        when no row uses any of them) -> ``[B, V]`` f32."""
        vocab = raw.shape[1]
        device = raw.device
        x = raw

        # min_tokens: stop ids -> -inf while the output is shorter than min_tokens (unless a
        # complete grammar allows nothing but the end).
        rows: list[int] = []
        cols: list[int] = []
        for b, s in enumerate(states):
            if s.guide is not None and s.guide.stopped:
                continue
            if len(s.output_token_ids) < s.params.min_tokens and s.stop_token_ids:
                rows.extend([b] * len(s.stop_token_ids))
                cols.extend(s.stop_token_ids)
        if rows:
            _check_ids(cols, vocab, "stop_token_ids")
            x = x.clone() if x is raw and not inplace else x
            x[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = float("-inf")

        # logit_bias, added.
        rows, cols, bias = [], [], []
        for b, s in enumerate(states):
            if s.params.logit_bias:
                rows.extend([b] * len(s.params.logit_bias))
                cols.extend(s.params.logit_bias.keys())
                bias.extend(s.params.logit_bias.values())
        if rows:
            _check_ids(cols, vocab, "logit_bias")
            x = x.clone() if x is raw and not inplace else x
            x.index_put_(
                (torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
                torch.tensor(bias, dtype=x.dtype, device=device),
                accumulate=True,
            )

        # Penalties, on the rows that use them: prompt mask and output counts [R, V] built by one
        # scatter each over the flattened (row * V + id) indices.
        pen = [b for b, s in enumerate(states) if s.needs_penalties]
        if pen:
            n = len(pen)
            prompt = _row_offsets([states[b].prompt_ids_tensor(device) for b in pen], vocab)
            output = _row_offsets([states[b].output_ids_tensor().to(device) for b in pen], vocab)
            prompt_mask = torch.zeros(n * vocab, dtype=torch.bool, device=device)
            prompt_mask = prompt_mask.index_fill_(0, prompt, True).view(n, vocab)
            counts = torch.zeros(n * vocab, dtype=torch.int32, device=device)
            ones = torch.ones_like(output, dtype=torch.int32)
            counts = counts.index_add_(0, output, ones).view(n, vocab)

            def column(name: str) -> torch.Tensor:
                values = [getattr(states[b].params, name) for b in pen]
                return torch.tensor(values, dtype=torch.float32, device=device)

            sub, index = _select(x, pen)
            penalised = apply_penalties(
                sub,
                prompt_mask,
                counts,
                column("repetition_penalty"),
                column("frequency_penalty"),
                column("presence_penalty"),
            )
            x = _merge(x, index, penalised)
        return x

    def _draw(self, x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """x: ``[R, V]`` f32 logits of the non-greedy rows -> ``[R]`` int64 drawn ids."""
        device = x.device
        temps = torch.tensor([s.params.temperature for s in states], device=device)
        x = x / temps[:, None]
        x = apply_top_k_top_p(x, [s.params.top_k for s in states], [s.params.top_p for s in states])
        x = apply_min_p(x, [s.params.min_p for s in states])
        probs = torch.softmax(x, dim=-1)  # [R, V]
        # Exponential race: argmax(probs / q), q ~ Exp(1), draws from probs (as vLLM does). q's
        # rows come from the rows' generators; rows sharing a generator object (None -> the
        # sampler's) fill theirs in one call, a seeded row's own generator only ever its row.
        q = torch.empty_like(probs)  # [R, V]
        groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
        for i, s in enumerate(states):
            g = self.generator if s.generator is None else s.generator
            groups.setdefault(id(g), (g, []))[1].append(i)
        for g, rows in groups.values():
            if len(rows) == len(states):
                q.exponential_(generator=g)
            elif len(rows) == 1:
                q[rows[0]].exponential_(generator=g)
            else:
                fill = torch.empty((len(rows), q.shape[1]), device=device)
                q[torch.tensor(rows, device=device)] = fill.exponential_(generator=g)
        # A zero q would make 0/0 = NaN on a filtered token; keep q positive.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        return probs.div_(q).argmax(dim=-1)


def _row_offsets(ids: list[torch.Tensor], vocab: int) -> torch.Tensor:
    """Per-row id tensors (same device) -> flat ``row * V + id`` int64 ``[sum len]``; sizes come
    from the host, so nothing waits for the device."""
    device = ids[0].device
    lengths = [t.numel() for t in ids]
    rows = torch.repeat_interleave(
        torch.arange(len(ids), device=device),
        torch.tensor(lengths, device=device),
        output_size=sum(lengths),
    )
    return rows * vocab + torch.cat(ids)


def _check_ids(ids: list[int], vocab: int, what: str) -> None:
    # Out-of-range indices would be a device-side assert on CUDA; fail readably instead.
    if max(ids) >= vocab:
        raise ValueError(f"{what}: token id {max(ids)} is outside the vocabulary [0, {vocab})")
