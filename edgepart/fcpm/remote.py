"""Remote profiling and link probes: the worker's side of the ``profile`` and ``probe`` frames, and the client.

``edgepart profile --endpoint HOST:PORT --key-file FILE --out F`` asks a running worker to
run the profiler's measurement sweep *inside the worker process* — so under its CPU share:
an emulated slow worker's cgroup quota, a container's limit — with the background-load
processes spawned by the worker (children inherit its cgroup, so "load" is other work in
the *device's* CPU budget). The worker sends back the raw measurements as JSON (no pickle,
bounded size); the client fits the FCPM and writes the profile, exactly as a local
``edgepart profile`` would have.

Frames (see docs/wire-format.md):

* ``profile`` client → worker, ``options`` {quick, seed, loads, budget, counts, nets, sustained}:
  checked here (types, bounds; anything else is refused with the reason and the connection
  closed, like every bad frame). Answers: ``profile_progress`` {done, total, phase} at most
  once a second, then ``profile_result`` (payload: the measurements as UTF-8 JSON, at most
  ``MAX_RESULT`` bytes) or ``profile_error`` {code, device, message}. One profile at a time
  per worker; the client going away aborts it. :func:`register` installs the handler on a worker.
* ``probe`` / ``probe_ping`` / ``probe_data`` — link measurements between workers, see
  :mod:`edgepart.fcpm.probe`.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any, Callable

import torch

from edgepart.errors import EdgepartError, ErrorCode, error_for
from edgepart.fcpm.profiler import COUNTS, DEFAULT_LOADS, MEASUREMENTS_FORMAT, fit_profile, measure
from edgepart.runtime.protocol import Channel, Failure, Frame, PeerClosed, ProtocolError, as_key
from edgepart.runtime.server import Conn
from edgepart.runtime.worker import Worker

log = logging.getLogger("edgepart.fcpm.remote")

MAX_RESULT = 64 << 20                 # bytes of measurement JSON a worker sends / a client accepts
MAX_LOADS = 8
MAX_BUDGET_S = 3600.0
MAX_COUNT = 2000                       # configurations per op family
MAX_NETS = 64
PROGRESS_EVERY_S = 1.0
OPTION_KEYS = ("quick", "seed", "loads", "budget", "counts", "nets", "sustained")


class _Aborted(Exception):
    pass


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_profile_options(opts: Any) -> dict:
    """Validate a ``profile`` frame's options; returns them normalised or raises ValueError with the reason."""
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise ValueError("profile options must be a JSON object")
    unknown = sorted(str(k)[:40] for k in opts if k not in OPTION_KEYS)
    if unknown:
        raise ValueError(f"unknown profile option(s) {unknown}; allowed: {list(OPTION_KEYS)}")
    out: dict = {}
    quick = opts.get("quick", False)
    if not isinstance(quick, bool):
        raise ValueError("profile option 'quick' must be true or false")
    out["quick"] = quick
    seed = opts.get("seed", 0)
    if type(seed) is not int or not 0 <= seed < 2 ** 31:
        raise ValueError("profile option 'seed' must be an integer in [0, 2^31)")
    out["seed"] = seed
    loads = opts.get("loads")
    if loads is None:
        loads = [0.0, 0.5] if quick else list(DEFAULT_LOADS)
    if not (isinstance(loads, list) and 1 <= len(loads) <= MAX_LOADS and all(_num(v) and 0 <= v <= 0.9
                                                                              for v in loads)):
        raise ValueError(f"profile option 'loads' must be a list of 1..{MAX_LOADS} numbers in [0, 0.9]")
    if len(set(loads)) != len(loads):
        raise ValueError("profile option 'loads' repeats a level")
    out["loads"] = sorted(float(v) for v in loads)
    budget = opts.get("budget")
    if budget is not None and not (_num(budget) and 0 < budget <= MAX_BUDGET_S):
        raise ValueError(f"profile option 'budget' must be seconds in (0, {MAX_BUDGET_S:.0f}] or null")
    out["budget"] = None if budget is None else float(budget)
    counts = opts.get("counts")
    if counts is not None:
        if not isinstance(counts, dict) or not counts:
            raise ValueError("profile option 'counts' must be an object {family: configurations}")
        bad = sorted(str(k)[:40] for k in counts if k not in COUNTS)
        if bad:
            raise ValueError(f"profile option 'counts': unknown families {bad}; known: {sorted(COUNTS)}")
        if not all(type(v) is int and 0 <= v <= MAX_COUNT for v in counts.values()):
            raise ValueError(f"profile option 'counts': each count must be an integer in [0, {MAX_COUNT}]")
        counts = dict(counts)
    out["counts"] = counts
    nets = opts.get("nets")
    if nets is not None and not (type(nets) is int and 0 <= nets <= MAX_NETS):
        raise ValueError(f"profile option 'nets' must be an integer in [0, {MAX_NETS}] or null")
    out["nets"] = nets
    sustained = opts.get("sustained", "auto")
    if sustained not in ("auto", True, False):
        raise ValueError("profile option 'sustained' must be \"auto\", true or false")
    out["sustained"] = sustained
    return out


# --- the worker's side -----------------------------------------------------------------------------

def register(worker: Worker, cpu_cores: float | None = None) -> None:
    """Take ``profile`` frames on the worker's server. ``cpu_cores``: the worker's CPU quota in cores,
    if it has one it cannot read itself (the test bed's cgroup, hidden by ``ip netns exec``)."""
    worker.server.register("profile", lambda conn, frame: _on_profile(worker, cpu_cores, conn, frame),
                           roles=("client",))


def _on_profile(worker: Worker, cpu_cores: float | None, conn: Conn, frame: Frame) -> None:
    opts = check_profile_options(frame.get("options"))      # ValueError: refused with the reason
    if not _profile_lock.acquire(blocking=False):
        conn.out.put({"kind": "profile_error", **Failure(ErrorCode.BUSY, worker.device,
                                                         f"worker {worker.address}: a profile is already running"
                                                         ).fields()})
        return
    threading.Thread(target=_run_profile, args=(worker, cpu_cores, conn, opts), name="profile", daemon=True).start()


_profile_lock = threading.Lock()


def _run_profile(worker: Worker, cpu_cores: float | None, conn: Conn, opts: dict) -> None:
    last = [0.0]

    def on_progress(done: int, total: int, phase: str) -> None:
        if conn.ch.closed or conn.out.dead or worker.stop_event.is_set():
            raise _Aborted()
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            conn.out.put({"kind": "profile_progress", "done": done, "total": total, "phase": phase[:80]})

    try:
        log.info("profiling this worker for %s: %s", conn.label(), opts)
        t0 = time.perf_counter()
        m = measure(quick=opts["quick"], loads=opts["loads"], seed=opts["seed"], budget_s=opts["budget"],
                    progress=False, name=worker.device, counts=opts["counts"], nets=opts["nets"],
                    sustained=opts["sustained"], cpu_cores=cpu_cores, on_progress=on_progress,
                    cpu=worker.executor.pin_cpu)     # where the worker computes, if it is pinned
        m["meta"]["remote"] = {"worker": worker.address, "device": worker.device}
        data = json.dumps(m, separators=(",", ":")).encode()
        if len(data) > MAX_RESULT:
            raise EdgepartError(f"measurements of {len(data)} bytes exceed the {MAX_RESULT}-byte bound")
        conn.out.put({"kind": "profile_result", "bytes": len(data)}, [data])
        log.info("profile done in %.1f s (%d measurements, %d bytes)", time.perf_counter() - t0,
                 len(m["records"]), len(data))
    except _Aborted:
        log.warning("profile aborted: %s went away", conn.label())
    except Exception as e:  # noqa: BLE001 — any failure is reported to the client, the worker stays up
        log.exception("profile failed")
        conn.out.put({"kind": "profile_error", **Failure(ErrorCode.PROFILE_FAILED, worker.device,
                                                         f"worker {worker.address}: {type(e).__name__}: {e}"
                                                         ).fields()})
    finally:
        torch.set_num_threads(max(1, worker.threads))
        _profile_lock.release()
        worker.server.request_trim()        # the sweep's buffers go back to the OS (#22: memory taken once)


# --- the client's side -----------------------------------------------------------------------------

def request(endpoint: str, key: bytes, header: dict, answers: tuple[str, ...], errors: tuple[str, ...],
            expect: Callable[[dict], Any] = lambda h: None, idle_timeout: float = 120.0,
            on_frame: Callable[[dict], None] | None = None, name: str = "edgepart", ch: Channel | None = None):
    """Send one control frame to a worker and wait for its answer (a frame of a kind in ``answers``).

    Frames of other kinds go to ``on_frame``; a kind in ``errors`` or a ``refused`` frame raises
    EdgepartError with the worker's reason; silence longer than ``idle_timeout`` raises too.
    """
    own = ch is None
    if own:
        try:
            ch = Channel.connect(endpoint, key, {"role": "client", "name": name})
        except OSError as e:
            raise EdgepartError(f"cannot reach the worker at {endpoint}: {e}") from None
    try:
        ch.sock.settimeout(idle_timeout)
        ch.send(header)
        while True:
            try:
                f = ch.recv(expect)
            except TimeoutError:
                raise EdgepartError(f"worker at {endpoint}: no answer for {idle_timeout:.0f} s") from None
            except PeerClosed:
                raise EdgepartError(f"worker at {endpoint} closed the connection") from None
            if f.kind in answers:
                return f
            if f.kind in errors:
                raise error_for(f.get("code"), f.get("device"),
                                str(f.get("message", f"{f.kind} from the worker at {endpoint}")))
            if f.kind == "refused":
                raise EdgepartError(f"worker at {endpoint} refused the request: {f.get('reason')}")
            if on_frame:
                on_frame(f.header)
    finally:
        if own:
            try:
                ch.send({"kind": "bye"})
            except (OSError, PeerClosed, ProtocolError):
                pass
            ch.close()


def remote_measure(endpoint: str, key, options: dict | None = None, idle_timeout: float = 120.0,
                   on_progress: Callable[[dict], None] | None = None) -> tuple[dict, str]:
    """Run the measurement sweep on the worker at ``endpoint``: (measurements, the worker's device name)."""
    key = as_key(key)
    opts = check_profile_options(dict(options or {}))       # fail here, not on the worker, if we can
    hello_name: list[str] = []

    def expect(h):
        if h["kind"] == "profile_result":
            return MAX_RESULT
        return None
    ch = None
    try:
        ch = Channel.connect(endpoint, key, {"role": "client", "name": "profiler"})
    except OSError as e:
        raise EdgepartError(f"cannot reach the worker at {endpoint}: {e}") from None
    try:
        hello_name.append(str(ch.peer.get("name") or ""))
        f = request(endpoint, key, {"kind": "profile", "options": opts}, ("profile_result",), ("profile_error",),
                    expect=expect, idle_timeout=idle_timeout, on_frame=on_progress, ch=ch)
    finally:
        try:
            ch.send({"kind": "bye"})
        except (OSError, PeerClosed, ProtocolError):
            pass
        ch.close()
    try:
        m = json.loads(f.parts[0].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise EdgepartError(f"worker at {endpoint}: measurements are not valid JSON ({e})") from None
    check_measurements(m)
    return m, hello_name[0]


def check_measurements(m: Any) -> None:
    """Structure check of measurements received from a worker before anything is fitted on them."""

    def bad(why):
        raise EdgepartError(f"malformed measurements from the worker: {why}")
    if not isinstance(m, dict) or m.get("format") != MEASUREMENTS_FORMAT:
        bad(f"format is not {MEASUREMENTS_FORMAT!r}")
    if not isinstance(m.get("meta"), dict) or not isinstance(m.get("configs"), list) \
            or not isinstance(m.get("records"), list):
        bad("needs meta, configs and records")
    cids = set()
    for c in m["configs"]:
        if not (isinstance(c, dict) and type(c.get("cid")) is int and isinstance(c.get("info"), dict)
                and isinstance(c.get("rows"), list)):
            bad("a configuration needs cid, info and rows")
        cids.add(c["cid"])
    for r in m["records"]:
        if not (isinstance(r, dict) and r.get("cid") in cids and type(r.get("rows")) is int and r["rows"] >= 1
                and _num(r.get("load")) and 0 <= r["load"] < 1 and _num(r.get("t")) and r["t"] > 0):
            bad(f"bad record {str(r)[:120]}")
    nets = m.get("nets") or {"infos": [], "records": []}
    if not (isinstance(nets, dict) and isinstance(nets.get("infos"), list) and isinstance(nets.get("records"), list)):
        bad("nets needs infos and records")
    for infos in nets["infos"]:
        for info in infos if isinstance(infos, list) else ():
            reuse = info.get("reuse") if isinstance(info, dict) else None
            if reuse is not None and not (isinstance(reuse, list) and len(reuse) <= 64 and all(
                    isinstance(v, list) and len(v) == 3 and _num(v[0]) and v[0] >= 0 and _num(v[1]) and v[1] >= 0
                    and (v[2] is None or (isinstance(v[2], str) and len(v[2]) <= 40)) for v in reuse)):
                bad(f"bad input reuse in a network's node info {str(reuse)[:120]}")
    for r in nets["records"]:
        if not (isinstance(r, dict) and type(r.get("net")) is int and 0 <= r["net"] < len(nets["infos"])
                and _num(r.get("load")) and _num(r.get("t")) and r["t"] > 0):
            bad(f"bad network record {str(r)[:120]}")
        layers = r.get("layers")
        if layers is None:
            continue
        n_nodes = len(nets["infos"][r["net"]]) if isinstance(nets["infos"][r["net"]], list) else 0
        if not isinstance(layers, list) or not all(
                isinstance(v, list) and len(v) == 2 and type(v[0]) is int and 0 <= v[0] < n_nodes
                and _num(v[1]) and v[1] > 0 for v in layers):
            bad(f"bad layer timings in network record {str(r)[:120]}")


def profile_remote(endpoint: str, key, options: dict | None = None, name: str | None = None,
                   idle_timeout: float = 120.0, on_progress: Callable[[dict], None] | None = None,
                   default_name: str | None = None):
    """Profile the worker at ``endpoint`` (in its own CPU share) and fit its FCPM here: a DeviceProfile.

    Its device name: ``name``, else the device the worker was deployed as, else ``default_name``,
    else the worker's host name."""
    m, dev = remote_measure(endpoint, key, options, idle_timeout, on_progress)
    m["meta"].setdefault("remote", {})["endpoint"] = endpoint
    return fit_profile(m, name=name or dev or default_name or None)
