"""The committed stubs are what scripts/gen_protos.py makes from the .proto, and the .proto
follows the Buf style rules the API promises (package kimi.v1, Request/Response names, enum
zero values *_UNSPECIFIED, optional numeric sampling fields)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from google.protobuf import descriptor

from kimi_grpc.proto import inference_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    gen = _gen_protos()
    for path in gen.generate(tmp_path):
        committed = ROOT / "kimi_grpc" / "proto" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run python scripts/gen_protos.py"
        )


def test_buf_style() -> None:
    file = pb.DESCRIPTOR
    assert file.package == "kimi.v1" and file.name == "kimi/v1/inference.proto"
    (service,) = file.services_by_name.values()
    assert service.full_name == "kimi.v1.InferenceService"
    assert {m.name for m in service.methods} >= {
        "Generate",
        "AgentStep",
        "Tokenize",
        "GetModelInfo",
        "GetServerStatus",
        "Abort",
    }
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"
    for enum in file.enum_types_by_name.values():
        prefix = "".join("_" + c if c.isupper() else c for c in enum.name).lstrip("_").upper()
        assert enum.values[0].number == 0 and enum.values[0].name == f"{prefix}_UNSPECIFIED"
        assert all(v.name.startswith(prefix + "_") for v in enum.values)


def test_numeric_sampling_fields_whose_zero_is_not_the_default_are_optional() -> None:
    fields = pb.SamplingParams.DESCRIPTOR.fields_by_name
    for name in ("n", "temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        assert fields[name].has_presence, name
    for name in ("max_tokens", "logprobs", "skip_special_tokens"):
        assert fields[name].has_presence, name
    scalar = descriptor.FieldDescriptor.TYPE_DOUBLE
    assert fields["temperature"].type == scalar
    assert pb.AgentStepRequest.DESCRIPTOR.fields_by_name["thinking_budget"].has_presence
