"""A worker killed (or hung) mid-run: errors within 5 s naming it, nothing hangs, works again after restart."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

import edgepart
from edgepart import models as zoo
from edgepart.errors import RemoteError, WorkerDied
from edgepart.runtime.client import Session
from edgepart.runtime.worker import serve
from tests.conftest import assert_close

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, (x,) = zoo.get("tinynet")
    d = tmp_path_factory.mktemp("tiny3f")
    edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(3), strategy="even").save(d)
    with edgepart.LocalCluster(d) as c:
        yield model.eval(), x, c


def run_until_failure(c, x, victim, action):
    """Stream requests; apply ``action`` mid-run; return (seconds from action to the first error, errors)."""
    stop = threading.Event()
    errors: list[tuple[float, Exception]] = []
    done = []

    def load():
        while not stop.is_set():
            try:
                futs = [c.submit(x) for _ in range(8)]
                for f in futs:
                    f.result(30)
                    done.append(1)
            except Exception as e:  # noqa: BLE001
                errors.append((time.monotonic(), e))
                return
    t = threading.Thread(target=load)
    t.start()
    while len(done) < 20:
        time.sleep(0.01)
    t_kill = time.monotonic()
    action()
    t.join(15)
    stop.set()
    assert not t.is_alive(), "requests hung after the worker went away"
    assert errors, "no error after the worker went away"
    return errors[0][0] - t_kill, errors[0][1]


@pytest.mark.parametrize("victim", ["d2", "d0"])
def test_killed_worker_fails_fast_naming_it_then_recovers(setup, victim):
    model, x, c = setup
    dt, err = run_until_failure(c, x, victim, lambda: c.kill(victim))
    assert dt < 5.0, f"error took {dt:.1f} s"
    assert isinstance(err, WorkerDied) and err.device == victim and repr(victim) in str(err), err
    # new requests fail fast too, naming the device
    t0 = time.monotonic()
    with pytest.raises(WorkerDied, match=repr(victim)):
        c.infer(x, timeout=10)
    assert time.monotonic() - t0 < 5.0
    c.restart(victim)
    y = c.infer(x, timeout=30)           # the session reconnects and redeploys
    with torch.no_grad():
        assert_close(y, model(x))
    ys = c.infer_many([x] * 20)
    assert all(torch.equal(v, y) for v in ys)


def test_hung_worker_detected_by_heartbeat(setup):
    model, x, c = setup
    victim = "d1"
    pid = c.pids[victim]
    try:
        dt, err = run_until_failure(c, x, victim, lambda: os.kill(pid, signal.SIGSTOP))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert dt < 5.0, f"error took {dt:.1f} s"
    assert repr(victim) in str(err), err
    c.restart(victim)
    with torch.no_grad():
        assert_close(c.infer(x, timeout=30), model(x))


@pytest.mark.slow
def test_quiet_worker_is_not_declared_dead(setup):
    """A worker is judged by unanswered pings, not by how long it has had nothing to say: after a
    long quiet spell (here faked: its last frame 100 s ago, as after a slow deploy of the other
    workers) it answers the next ping and stays alive."""
    model, x, c = setup
    s = c.session
    for link in s.links.values():
        link.last_seen = time.monotonic() - 100.0
    time.sleep(3 * s.heartbeat + 0.5)
    assert all(link.alive for link in s.links.values()), {d: l.reason for d, l in s.links.items()}
    assert_close(c.infer(x), model(x))


def test_stage_failure_on_another_device_is_a_remote_error_naming_it(tmp_path):
    """A stage that raises on d1 fails the request with code stage_failed: the client gets a
    RemoteError (not WorkerDied) naming d1, and the workers keep serving."""
    model, (x,) = zoo.get("tinynet")
    edgepart.compile(model, (x,), edgepart.Cluster.homogeneous(3), strategy="even").save(tmp_path / "b")
    key = b"k" * 32
    workers = {d: serve("127.0.0.1:0", key) for d in ("d0", "d1", "d2")}
    try:
        with Session(tmp_path / "b", {d: w.address for d, w in workers.items()}, key) as s:
            prog = workers["d1"].executor.active.program
            run_stage = prog.run_stage

            def broken(stage, store):
                raise RuntimeError("the device is down to its last byte")      # text that looks like a death
            prog.run_stage = broken
            with pytest.raises(RemoteError, match="d1.*stage") as e:
                s.infer(x, timeout=10)
            assert not isinstance(e.value, WorkerDied)
            prog.run_stage = run_stage
            with torch.no_grad():
                assert_close(s.infer(x, timeout=10), model.eval()(x))
    finally:
        for w in workers.values():
            w.stop()
