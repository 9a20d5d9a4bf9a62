"""The committed gencode matches protos/kvfabric.proto, and imports the way the services use it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the code")

from protos import generate, kvfabric_pb2, kvfabric_pb2_grpc  # noqa: E402

COMMITTED = Path(generate.__file__).parent


def test_committed_descriptor_matches_the_proto(tmp_path):
    fresh = descriptor_pb2.FileDescriptorSet.FromString(generate.descriptor_set(tmp_path / "kvfabric.desc"))
    committed = descriptor_pb2.FileDescriptorProto.FromString(kvfabric_pb2.DESCRIPTOR.serialized_pb)
    assert [f.name for f in fresh.file] == ["protos/kvfabric.proto"]
    _clear_json_names(fresh.file[0].message_type)  # protoc fills them in --descriptor_set_out only
    assert committed == fresh.file[0], "protos/kvfabric_pb2.py is stale: run protos/generate.py"


def test_committed_grpc_module_covers_every_rpc():
    text = (COMMITTED / "kvfabric_pb2_grpc.py").read_text()
    assert "from protos import kvfabric_pb2 as" in text
    for service in kvfabric_pb2.DESCRIPTOR.services_by_name.values():
        for name in (f"{service.name}Stub", f"{service.name}Servicer", f"add_{service.name}Servicer_to_server"):
            assert hasattr(kvfabric_pb2_grpc, name), f"kvfabric_pb2_grpc.py is stale: no {name}"
        for method in service.methods:
            kind = "unary_stream" if method.server_streaming else "unary_unary"
            call = re.search(rf"self\.{method.name} = channel\.(\w+)\(\s*'/{service.full_name}/{method.name}'", text)
            assert call and call.group(1) == kind, f"kvfabric_pb2_grpc.py is stale for {service.name}.{method.name}"


def test_regenerating_with_the_pinned_tools_reproduces_the_files(tmp_path):
    if generate.grpcio_tools_version() != generate.PINNED_GRPCIO_TOOLS:
        pytest.skip(f"text is only reproducible with grpcio-tools=={generate.PINNED_GRPCIO_TOOLS}")
    for fresh in generate.generate(tmp_path):
        assert fresh.read_text() == (COMMITTED / fresh.name).read_text(), f"{fresh.name} is stale"


def test_regenerated_stub_declares_the_same_messages(tmp_path):
    pinned = generate.grpcio_tools_version() == generate.PINNED_GRPCIO_TOOLS
    with _no_warning() if pinned else pytest.warns(UserWarning):
        fresh = generate.generate(tmp_path)
    declared = lambda text: sorted(re.findall(r"^class (\w+)\(_message\.Message\)", text, re.M))  # noqa: E731
    pyi = next(p for p in fresh if p.suffix == ".pyi")
    assert declared(pyi.read_text()) == declared((COMMITTED / pyi.name).read_text())


def test_gencode_carries_no_runtime_version_floor():
    # Newer protoc emits ValidateProtobufRuntimeVersion(<its own version>), which refuses older
    # runtimes; the pinned one emits none, so the code loads on protobuf 5.26 .. 7.
    assert "ValidateProtobufRuntimeVersion" not in (COMMITTED / "kvfabric_pb2.py").read_text()
    assert "raise RuntimeError" not in (COMMITTED / "kvfabric_pb2_grpc.py").read_text()


def test_optional_fields_report_presence():
    p = kvfabric_pb2.SamplingParams(temperature=0.0, max_tokens=5)
    assert p.HasField("temperature") and p.temperature == 0.0
    assert not p.HasField("top_p") and not p.HasField("seed") and not p.HasField("logprobs")
    req = kvfabric_pb2.GenerateRequest(request_id="r", prompt_token_ids=[1, 2], params=p, output_token_ids=[7])
    assert kvfabric_pb2.GenerateRequest.FromString(req.SerializeToString()) == req


def _clear_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
