"""Worker processes of the local testbeds: start, fail to start with the log named, stop."""
from __future__ import annotations

import sys

import pytest

from edgepart.errors import EdgepartError
from edgepart.testbed.processes import start_worker, stop_process_groups, worker_env


def test_a_worker_that_listens_gives_its_address_and_stops(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('edgepart worker listening on 127.0.0.1:4321', flush=True); "
                                 "time.sleep(60)"]
    proc, addr = start_worker(cmd, tmp_path / "w.log", worker_env(1), 10.0, "worker 'd0'")
    assert addr == "127.0.0.1:4321" and proc.poll() is None
    stop_process_groups([proc], grace_s=2.0)
    assert proc.poll() is not None


def test_a_worker_that_exits_is_named_with_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('no such model'); sys.exit(3)"]
    seen = []
    with pytest.raises(EdgepartError, match=r"(?s)worker 'd0' did not start \(exit code 3\).*no such model"):
        start_worker(cmd, tmp_path / "w.log", worker_env(1), 10.0, "worker 'd0'", on_spawn=seen.append)
    assert len(seen) == 1        # the caller got the process to stop it


def test_a_silent_worker_times_out(tmp_path):
    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    seen = []
    with pytest.raises(EdgepartError, match="did not start"):
        start_worker(cmd, tmp_path / "w.log", worker_env(1), 0.5, "worker 'd0'", on_spawn=seen.append)
    stop_process_groups(seen, grace_s=1.0)
    assert seen[0].poll() is not None


def test_stop_kills_a_group_that_ignores_sigterm(tmp_path):
    cmd = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print('edgepart worker listening on 127.0.0.1:1', flush=True); time.sleep(60)"]
    proc, _ = start_worker(cmd, tmp_path / "w.log", worker_env(1), 10.0, "worker 'd0'")
    stop_process_groups([proc], grace_s=0.5)
    assert proc.poll() is not None
