"""The worker's frame registry, and error frames decided by their code (not their text)."""
from __future__ import annotations

import collections
import threading

import pytest

from edgepart.errors import BundleError, ErrorCode, RemoteError, WorkerDied, error_for
from edgepart.runtime import protocol as P
from edgepart.runtime.client import Session
from edgepart.runtime.server import Server

KEY = b"k" * 32


@pytest.fixture
def server():
    stop = threading.Event()
    s = Server("127.0.0.1:0", KEY, lambda: {"role": "worker", "name": "w"}, collections.Counter(), stop)
    s.register("echo", lambda conn, f: conn.out.put({"kind": "echoed", "n": f.get("n")}))
    s.register("only_probe", lambda conn, f: None, roles=("probe",))
    s.start()
    yield s
    stop.set()
    s.close()


def talk(server, *headers, role="client"):
    ch = P.Channel.connect(server.address, KEY, {"role": role, "name": "t"})
    try:
        for h in headers:
            ch.send(h)
        return ch.recv(lambda h: None)
    finally:
        ch.close()


def test_registered_kind_is_dispatched_and_ping_answered(server):
    assert talk(server, {"kind": "echo", "n": 3}).header == {"kind": "echoed", "n": 3}
    assert talk(server, {"kind": "ping", "t": 1.5}).header == {"kind": "pong", "t": 1.5}


def test_unknown_frame_kind_is_refused_by_the_registry(server):
    f = talk(server, {"kind": "no_such_kind"})
    assert f.kind == "refused" and "unknown frame kind 'no_such_kind'" in f.get("reason")
    assert server.stats["refused"] == 1
    assert talk(server, {"kind": "echo", "n": 1}).kind == "echoed"          # the server stays up


def test_kind_refused_on_a_connection_of_another_role(server):
    f = talk(server, {"kind": "only_probe"}, role="client")
    assert f.kind == "refused" and "come only on a probe connection" in f.get("reason")


def test_a_kind_is_registered_once(server):
    with pytest.raises(ValueError, match="already registered"):
        server.register("echo", lambda conn, f: None)


def error_frame(code, device, message):
    return {"kind": "error", "req": "s:1", "code": code, "device": device, "message": message}


def test_client_raises_by_code_not_by_text():
    down = Session._remote_error(error_frame("peer_down", "d2", "device 'd2' is down: closed the connection"))
    assert isinstance(down, WorkerDied) and down.device == "d2"
    # a stage failure whose text looks like a peer going down stays a stage failure
    stage = Session._remote_error(error_frame("stage_failed", "d1", "device 'd1' is down: stage 3: RuntimeError"))
    assert isinstance(stage, RemoteError) and not isinstance(stage, WorkerDied)
    # and a peer going down is one whatever its text says
    assert isinstance(Session._remote_error(error_frame("peer_down", "d0", "anything")), WorkerDied)
    for code in ("timeout", "redeployed", "client_gone", "internal", "no_such_code", None):
        assert type(Session._remote_error(error_frame(code, "d0", "x"))) is RemoteError, code


def test_error_code_table():
    assert isinstance(error_for(ErrorCode.DEPLOY_FAILED, "d0", "bad file"), BundleError)
    assert isinstance(error_for("peer_down", "d3", "gone"), WorkerDied)
    assert str(error_for("stage_failed", "d1", "stage 2 failed")) == "stage 2 failed"


def test_failure_fields_round_trip_and_bad_codes_are_refused():
    f = P.Failure(ErrorCode.TIMEOUT, "d1", "request timed out")
    assert f.fields() == {"code": "timeout", "device": "d1", "message": "request timed out"}
    assert P.Failure.from_header({"kind": "fail", **f.fields()}) == f
    with pytest.raises(P.ProtocolError, match="unknown error code"):
        P.Failure.from_header({"kind": "fail", "code": "bogus", "device": "d1", "message": "x"})
