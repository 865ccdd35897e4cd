"""Guided decoding: tool calls and JSON answers valid by construction.

``backend`` (the grammar-engine interface) and ``llguidance_backend`` (its implementation),
``tool_grammar`` (the Kimi tool-call grammar), ``guide`` (per-completion state: reasoning, then the
grammar), ``masks`` (one step's masks, filled while the forward runs, applied to raw logits).
"""

from kimi_grpc.guided.backend import GrammarBackend, GrammarError
from kimi_grpc.guided.guide import Constraint, Guide, GuideError
from kimi_grpc.guided.masks import GuidedStats, MaskFiller, StepMasks, apply_masks
from kimi_grpc.guided.tool_grammar import GrammarBuilder, ToolGrammar

__all__ = [
    "Constraint",
    "GrammarBackend",
    "GrammarBuilder",
    "GrammarError",
    "Guide",
    "GuideError",
    "GuidedStats",
    "MaskFiller",
    "StepMasks",
    "ToolGrammar",
    "apply_masks",
]
