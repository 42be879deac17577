from __future__ import annotations

import json

import pytest

from banger.errors import BadRequest, BangerError
from banger.rpc import protocol
from banger.rpc.protocol import Params


def test_request_roundtrip() -> None:
    line = protocol.encode_request("vm.show", {"ref": "x"}, "op-abc123")
    req = protocol.decode_request(line)
    assert (req.method, req.params, req.op_id) == ("vm.show", {"ref": "x"}, "op-abc123")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"not json\n", "request is not valid JSON"),
        (b"[1]\n", "request must be a JSON object"),
        (
            b'{"v":1,"method":"Vm.List"}\n',
            "request field 'method' must be a dotted lowercase name, got 'Vm.List'",
        ),
        (b'{"v":1,"method":"vm.list","params":[]}\n', "request field 'params' must be a JSON object"),
        (
            b'{"v":1,"method":"vm.list","op_id":"xyz"}\n',
            "request field 'op_id' must look like op-1a2b3c, got 'xyz'",
        ),
        (b'{"v":1,"method":"vm.list","extra":1}\n', "request has unknown field(s): extra"),
    ],
)
def test_bad_requests(line: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as exc:
        protocol.decode_request(line)
    assert exc.value.message.startswith(message)


def test_bad_version_code() -> None:
    with pytest.raises(BangerError) as exc:
        protocol.decode_request(b'{"v":2,"method":"vm.list"}\n')
    assert exc.value.code == "bad_version"
    assert "protocol version 2 is not supported" in exc.value.message


def test_error_encoding_and_render() -> None:
    raw = json.loads(
        protocol.encode_error("not_found", "no vm named 'x'", "see `banger vm list`", "op-0a0b0c")
    )
    err = protocol.error_from_response(raw["error"])
    assert err.code == "not_found" and err.op_id == "op-0a0b0c"
    assert err.render() == "not found: no vm named 'x'; see `banger vm list` (op-0a0b0c)"
    failed = protocol.RpcError("operation_failed", "disk full", op_id="op-111111")
    assert failed.render() == "disk full (op-111111)"
    # Codes outside the known set are never put on the wire.
    assert json.loads(protocol.encode_error("weird", "m", None, None))["error"]["code"] == "operation_failed"


def test_params_typed_getters() -> None:
    p = Params({"name": "x", "n": 3, "flag": True, "list": ["a"]}, allowed={"name", "n", "flag", "list"})
    assert p.get_str("name", required=True) == "x"
    assert p.get_int("n", minimum=1) == 3
    assert p.get_bool("flag") is True
    assert p.get_str_list("list") == ["a"]
    assert p.get_str("missing", default="d") == "d"


@pytest.mark.parametrize(
    ("params", "call", "message"),
    [
        ({"x": 1}, lambda p: None, "unknown param(s): x"),
        ({}, lambda p: p.get_str("name", required=True), "param 'name' is required"),
        ({"name": ""}, lambda p: p.get_str("name", required=True), "param 'name' must not be empty"),
        ({"name": 5}, lambda p: p.get_str("name"), "param 'name' must be a string, got int"),
        ({"n": "5"}, lambda p: p.get_int("n"), "param 'n' must be an integer, got str"),
        ({"n": True}, lambda p: p.get_int("n"), "param 'n' must be an integer, got bool"),
        ({"n": 0}, lambda p: p.get_int("n", minimum=1), "param 'n' must be >= 1, got 0"),
        ({"n": 99}, lambda p: p.get_int("n", maximum=64), "param 'n' must be <= 64, got 99"),
        ({"flag": "yes"}, lambda p: p.get_bool("flag"), "param 'flag' must be true or false, got 'yes'"),
        ({"list": "a"}, lambda p: p.get_str_list("list"), "param 'list' must be a list of strings"),
    ],
)
def test_params_errors(params: dict[str, object], call: object, message: str) -> None:
    allowed = {"name", "n", "flag", "list"}
    with pytest.raises(BadRequest) as exc:
        p = Params(dict(params), allowed=allowed)
        call(p)  # type: ignore[operator]
    assert exc.value.message == message
