"""Network probe: bandwidth, round-trip time and per-message overhead between workers, into a cluster file.

    edgepart probe --endpoints FILE --key-file FILE [--cluster IN.yaml] --out cluster.yaml

The client asks each worker, in turn, to measure its link *towards each other worker*
(worker to worker: those are the links pieces travel on; the client's own links do not
matter). Worker A opens a probe connection to worker B — the ordinary authenticated
frame protocol, role ``probe`` — and, sending through the same per-peer shaping its
pieces get under emulation (the token bucket / delay line of ``--links``):

1. **RTT**: ``pings`` small ``probe_ping`` → ``probe_pong`` round trips (median); the
   one-way ``latency_ms`` written to the cluster file is RTT / 2;
2. **per-message overhead**: ``messages`` small ``probe_data`` frames back to back, then
   a ping; (time − RTT) / messages is what one more message costs (framing, MACs,
   system calls, scheduling);
3. **bandwidth**: a few MB as ``probe_data`` pieces of ``piece_bytes``, then a ping: B answers
   only after it has read every byte, so bytes × 8 / (time − RTT) is the link's rate. A
   short transfer first sizes the main one to about ``seconds`` (at most ``max_bytes``); the
   best of ``repeats`` transfers is kept (other traffic only ever slows a transfer down).

B drops ``probe_data`` payloads unread and answers a ``probe_ping`` after its own shaping
delay towards A (so both directions of an emulated link count). Both directions of every
pair are measured; the cluster file gets, per pair, the lower of the two bandwidths and
the mean latency (the cost model has one value per pair), the median over pairs as the
default link, and a ``probe:`` section with every direction's raw numbers. Devices (speeds,
memory, profiles, source) are kept from ``--cluster``.

The endpoints file maps device → host:port as the client reaches the workers; when the
workers reach each other at other addresses (NAT, or the netns testbed), add
``peer_endpoints: {a: {b: host:port}}`` next to ``endpoints:``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from edgepart.cluster import Cluster
from edgepart.errors import EdgepartError, ErrorCode
from edgepart.fcpm.remote import request
from edgepart.runtime.client import load_endpoints
from edgepart.runtime.protocol import (Channel, Failure, Frame, PeerClosed, ProtocolError, as_key, parse_address,
                                       read_key)
from edgepart.runtime.server import Conn
from edgepart.runtime.transport import FRAME_EXTRA, LinkShaper
from edgepart.runtime.worker import Worker

log = logging.getLogger("edgepart.fcpm.probe")

MAX_PROBE_FRAME = 1 << 20
DEFAULTS = {"pings": 20, "messages": 200, "small_bytes": 64, "piece_bytes": 256 << 10, "max_bytes": 16 << 20,
            "seconds": 0.5, "repeats": 2}
BOUNDS = {"pings": (1, 1000), "messages": (1, 10000), "small_bytes": (0, 65536),
          "piece_bytes": (1024, MAX_PROBE_FRAME), "max_bytes": (1 << 20, 256 << 20), "seconds": (0.05, 30.0),
          "repeats": (1, 10)}
NAME_MAX = 64


def check_probe_options(opts: Any) -> dict:
    """Validate probe options (types, bounds); returns them with defaults filled, or raises ValueError."""
    if opts is None:
        opts = {}
    if not isinstance(opts, dict):
        raise ValueError("probe options must be a JSON object")
    unknown = sorted(str(k)[:40] for k in opts if k not in DEFAULTS)
    if unknown:
        raise ValueError(f"unknown probe option(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    out = dict(DEFAULTS)
    for k, v in opts.items():
        lo, hi = BOUNDS[k]
        if isinstance(DEFAULTS[k], int):
            ok = type(v) is int and lo <= v <= hi
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
        if not ok:
            raise ValueError(f"probe option {k!r} must be a {'n integer' if isinstance(DEFAULTS[k], int) else ' number'}"
                             f" in [{lo}, {hi}]")
        out[k] = v
    return out


def check_probe_request(h: dict) -> dict:
    """The ``probe`` frame: {self, peer, address, options}; raises ValueError with the reason if malformed."""
    me, peer, address = h.get("self"), h.get("peer"), h.get("address")
    for what, v in (("self", me), ("peer", peer)):
        if not isinstance(v, str) or not 0 < len(v) <= NAME_MAX:
            raise ValueError(f"probe frame needs {what!r}: a device name of at most {NAME_MAX} characters")
    if me == peer:
        raise ValueError("probe frame: a worker does not probe itself")
    if not isinstance(address, str) or len(address) > 300:
        raise ValueError("probe frame needs 'address': the peer's host:port as this worker reaches it")
    parse_address(address)                              # ValueError if malformed
    return {"self": me, "peer": peer, "address": address, "options": check_probe_options(h.get("options"))}


# --- the worker's side ----------------------------------------------------------------------------------

def register(worker: Worker) -> None:
    """Take the probe frames on the worker's server: ``probe`` from a client (this worker probes a
    peer), ``probe_ping`` / ``probe_data`` on a probe connection from a probing worker."""
    s = worker.server
    s.register("probe", lambda conn, frame: _on_probe(worker, conn, frame), roles=("client",))
    s.register("probe_ping", lambda conn, frame: answer_ping(worker, conn, frame.header), roles=("probe",))
    s.register("probe_data", lambda conn, frame: None,      # bytes on the wire are the point; dropped
               expect=lambda conn, h: MAX_PROBE_FRAME, roles=("probe",))


MAX_PROBES = 2                  # probes a worker runs at once; one more is answered probe_error (busy)
_probes = threading.BoundedSemaphore(MAX_PROBES)


def probe_target_allowed(worker: Worker, address: str) -> str | None:
    """None if this worker may probe ``address``, else why not. With a bundle deployed, only its
    peers' addresses (a probe frame must not make the worker a port scanner); before the first
    deploy — when probes measure the links a cluster file is made from — any address, since the
    probe connection must still complete an authenticated handshake with the shared key."""
    active = worker.executor.active
    if active is not None and address not in set(active.peers.values()):
        return (f"{address[:100]} is not the address of a peer of the deployed bundle "
                f"({sorted(set(active.peers.values()))[:8]})")
    return None


def _on_probe(worker: Worker, conn: Conn, frame: Frame) -> None:
    req = check_probe_request(frame.header)                  # ValueError: refused with the reason
    why_not = probe_target_allowed(worker, req["address"])
    if why_not is None and not _probes.acquire(blocking=False):
        why_not = f"{MAX_PROBES} probes are already running on this worker; try again when they are done"
        code = ErrorCode.BUSY
    else:
        code = ErrorCode.PROBE_FAILED
    if why_not is not None:
        conn.out.put({"kind": "probe_error", "peer": req["peer"], **Failure(
            code, worker.device, f"worker {worker.address} refuses probing {req['peer']!r}: {why_not}").fields()})
        return
    try:
        threading.Thread(target=_run_probe, args=(worker, conn, req), name="probe", daemon=True).start()
    except RuntimeError:
        _probes.release()
        raise ValueError("cannot start a probe thread now") from None


def _run_probe(worker: Worker, conn: Conn, req: dict) -> None:
    try:
        result = run_probe(worker, req)
        conn.out.put({"kind": "probe_result", "peer": req["peer"], "result": result})
    except Exception as e:  # noqa: BLE001
        log.warning("probe of %s at %s failed: %s", req["peer"], req["address"], e)
        # what answered at the address is not quoted back (it may be any service): only what kind of failure
        why = ("no edgepart worker with this key answered there" if isinstance(e, (ProtocolError, PeerClosed))
               else "unreachable" if isinstance(e, OSError) else type(e).__name__)
        conn.out.put({"kind": "probe_error", "peer": req["peer"], **Failure(
            ErrorCode.PROBE_FAILED, worker.device, f"worker {worker.address} probing {req['peer']!r} at "
                                                   f"{req['address']}: {why}").fields()})
    finally:
        _probes.release()


def _link_shaper(worker: Worker, peer: str) -> LinkShaper | None:
    """The emulated link to ``peer`` alone, without the device's shared NIC (None: a real link)."""
    return worker.link_shaper(peer, False) if worker.link_shaper is not None else None


# --- on the probed worker (B) ------------------------------------------------------------------------

def answer_ping(worker: Worker, conn: Conn, h: dict) -> None:
    """Answer a ``probe_ping`` after this worker's emulated latency towards the prober (none on a real link)."""
    shaper = _link_shaper(worker, conn.name)
    if shaper is not None:
        now = time.monotonic()
        delay = shaper.release_time(now) - now
        if delay > 0:
            time.sleep(min(delay, 5.0))        # only this probe connection's reader waits
    t = h.get("t")
    conn.out.put({"kind": "probe_pong", "t": t if isinstance(t, (int, float)) and not isinstance(t, bool) else None})


# --- on the probing worker (A) -------------------------------------------------------------------------

def run_probe(worker: Worker, req: dict) -> dict:
    """Measure RTT, per-message overhead and bandwidth from this worker to ``req['peer']``."""
    o = req["options"]
    shaper = _link_shaper(worker, req["peer"])
    ch = Channel.connect(req["address"], worker.key, {"role": "probe", "name": req["self"]}, timeout=5.0)
    ch.sock.settimeout(60.0)
    small = bytes(o["small_bytes"])
    piece = memoryview(bytes(o["piece_bytes"]))

    def send(header: dict, parts=(), enq: float | None = None) -> None:
        if shaper is not None:                 # what the worker's PeerLink does for a piece (but the NIC)
            delay = shaper.release_time(time.monotonic() if enq is None else enq) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            shaper.consume(sum(len(p) for p in parts) + FRAME_EXTRA)
        ch.send(header, parts)

    def pong() -> None:
        f = ch.recv(lambda h: None)
        if f.kind == "refused":
            raise EdgepartError(f"the peer refused the probe: {f.get('reason')}")
        if f.kind != "probe_pong":
            raise EdgepartError(f"expected probe_pong, got {f.kind!r}")

    def burst(n: int, data, enq: float) -> float:
        """Send n probe_data frames and a ping, all queued at ``enq``; seconds until the pong."""
        t0 = time.perf_counter()
        for _ in range(n):
            send({"kind": "probe_data"}, [data], enq)
        send({"kind": "probe_ping", "t": enq}, (), enq)
        pong()
        return time.perf_counter() - t0

    try:
        rtts = []
        for i in range(3 + o["pings"]):
            t0 = time.perf_counter()
            send({"kind": "probe_ping", "t": t0})
            pong()
            if i >= 3:                         # the first three warm the connection up
                rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts)
        t_small = burst(o["messages"], small, time.monotonic())
        overhead = max(0.0, (t_small - rtt) / o["messages"])
        pb = len(piece)
        warm_n = max(1, (256 << 10) // pb)
        t_warm = burst(warm_n, piece, time.monotonic())
        bw0 = warm_n * pb / max(t_warm - rtt, 1e-4)                      # bytes / s, rough
        size = min(o["max_bytes"], max(1 << 20, int(bw0 * o["seconds"])))
        n = max(1, size // pb)
        runs = []
        for _ in range(o["repeats"]):
            t = burst(n, piece, time.monotonic())
            runs.append(n * pb * 8 / max(t - rtt, 1e-6) / 1e6)
        try:
            ch.send({"kind": "bye"})
        except (OSError, PeerClosed, ProtocolError):
            pass
    finally:
        ch.close()
    return {"rtt_ms": rtt * 1e3, "rtt_min_ms": min(rtts) * 1e3, "latency_ms": rtt / 2 * 1e3,
            "overhead_us": overhead * 1e6, "bandwidth_mbps": max(runs), "bandwidth_runs_mbps": runs,
            "bytes": n * pb, "piece_bytes": pb, "messages": o["messages"], "pings": o["pings"],
            "shaped_in_sender": shaper is not None}


# --- the client ---------------------------------------------------------------------------------------

RESULT_KEYS = ("rtt_ms", "latency_ms", "overhead_us", "bandwidth_mbps")


def probe(endpoints, key, peer_endpoints: dict | None = None, pairs: list[tuple[str, str]] | None = None,
          options: dict | None = None, idle_timeout: float = 120.0, progress=None) -> list[dict]:
    """Ask the workers to measure every ordered pair of devices (or ``pairs``); [{a, b, rtt_ms, ...}].

    ``endpoints``: {device: host:port} as this client reaches them; ``peer_endpoints``:
    {a: {b: host:port}} where worker a reaches worker b (default: ``endpoints``).
    """
    key = as_key(key)
    endpoints = load_endpoints(endpoints)
    opts = check_probe_options(dict(options or {}))
    devices = list(endpoints)
    if pairs is None:
        pairs = [(a, b) for a in devices for b in devices if a != b]
    for a, b in pairs:
        if a not in endpoints or b not in endpoints or a == b:
            raise EdgepartError(f"probe pair ({a}, {b}) must name two different devices of {devices}")
    chans: dict[str, Channel] = {}
    out = []
    try:
        for a, b in pairs:
            if a not in chans:
                try:
                    chans[a] = Channel.connect(endpoints[a], key, {"role": "client", "name": "probe"})
                except OSError as e:
                    raise EdgepartError(f"cannot reach device {a!r} at {endpoints[a]}: {e}") from None
                except ProtocolError as e:
                    raise EdgepartError(f"device {a!r} at {endpoints[a]}: {e}") from None
            addr = ((peer_endpoints or {}).get(a) or {}).get(b) or endpoints[b]
            f = request(endpoints[a], key, {"kind": "probe", "self": a, "peer": b, "address": addr,
                                            "options": opts},
                        ("probe_result",), ("probe_error",), idle_timeout=idle_timeout, ch=chans[a])
            r = f.get("result")
            if not (isinstance(r, dict) and all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
                                                and r[k] >= 0 for k in RESULT_KEYS) and r["bandwidth_mbps"] > 0):
                raise EdgepartError(f"device {a!r}: malformed probe result {str(r)[:200]}")
            row = {"a": a, "b": b, **{k: float(r[k]) for k in RESULT_KEYS},
                   "bandwidth_runs_mbps": [float(v) for v in r.get("bandwidth_runs_mbps", [])][:10],
                   "bytes": int(r.get("bytes", 0))}
            out.append(row)
            if progress:
                progress(row)
    finally:
        for ch in chans.values():
            try:
                ch.send({"kind": "bye"})
            except (OSError, PeerClosed, ProtocolError):
                pass
            ch.close()
    return out


def _sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}") if v else 0.0


def cluster_from_probe(results: list[dict], endpoints: dict[str, str], cluster: dict | None = None) -> dict:
    """A cluster description (the README's YAML format) with the probed links; devices kept from ``cluster``."""
    pairs: dict[frozenset, list[dict]] = {}
    for r in results:
        pairs.setdefault(frozenset((r["a"], r["b"])), []).append(r)
    if cluster is not None:
        out = copy.deepcopy(cluster)
        names = [d["name"] for d in out["devices"]]
        missing = [n for n in names if n not in endpoints]
        if missing:
            raise EdgepartError(f"cluster devices {missing} have no endpoint to probe")
        for d in out["devices"]:
            d.setdefault("address", endpoints[d["name"]])
    else:
        names = list(endpoints)
        out = {"devices": [{"name": n, "speed": 1.0, "address": endpoints[n]} for n in names]}
    overrides, summary = [], []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            rs = pairs.get(frozenset((a, b)))
            if not rs:
                raise EdgepartError(f"no probe result for the link {a}-{b}")
            bw = min(r["bandwidth_mbps"] for r in rs)
            lat = statistics.mean(r["latency_ms"] for r in rs)
            overrides.append({"a": a, "b": b, "bandwidth_mbps": _sig(bw), "latency_ms": round(lat, 4)})
    for r in results:
        summary.append({"from": r["a"], "to": r["b"], "bandwidth_mbps": _sig(r["bandwidth_mbps"]),
                        "rtt_ms": round(r["rtt_ms"], 4), "overhead_us": round(r["overhead_us"], 2),
                        "bytes": r.get("bytes", 0)})
    links = dict(out.get("links") or {})
    if overrides:
        links["default"] = {"bandwidth_mbps": _sig(statistics.median(o["bandwidth_mbps"] for o in overrides)),
                            "latency_ms": round(statistics.median(o["latency_ms"] for o in overrides), 4)}
    links["overrides"] = overrides
    out["links"] = links
    out["probe"] = {"measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "note": "per pair: the lower bandwidth of the two directions, latency = mean RTT / 2",
                    "directions": summary}
    return out


def load_endpoints_file(path) -> tuple[dict[str, str], dict | None]:
    """(endpoints, peer_endpoints or None) from a YAML/JSON file: a plain {device: host:port} mapping,
    or {endpoints: {...}, peer_endpoints: {a: {b: host:port}}}."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise EdgepartError(f"cannot read endpoints file {path}: {e}") from e
    peers = data.get("peer_endpoints") if isinstance(data, dict) and "endpoints" in data else None
    if peers is not None and not (isinstance(peers, dict) and all(
            isinstance(v, dict) and all(isinstance(x, str) for x in v.values()) for v in peers.values())):
        raise EdgepartError(f"{path}: peer_endpoints must map a device to {{peer: 'host:port'}}")
    if isinstance(data, dict) and isinstance(data.get("endpoints"), dict):
        data = data["endpoints"]
    return load_endpoints(data), peers


def main(argv: list[str] | None = None) -> int:
    """``edgepart probe``: measure the links between running workers and write a cluster file."""
    ap = argparse.ArgumentParser(prog="edgepart probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoints", required=True, help="YAML/JSON: {device: host:port} (or endpoints: + "
                                                       "peer_endpoints:)")
    ap.add_argument("--key-file", required=True, help="the workers' shared key")
    ap.add_argument("--cluster", help="cluster YAML whose devices (speeds, memory, profiles) are kept")
    ap.add_argument("--out", required=True, help="cluster YAML to write")
    ap.add_argument("--pings", type=int, default=DEFAULTS["pings"], help="round trips for the RTT (median)")
    ap.add_argument("--seconds", type=float, default=DEFAULTS["seconds"],
                    help="about how long each bandwidth transfer lasts")
    ap.add_argument("--max-mb", type=float, default=DEFAULTS["max_bytes"] / (1 << 20),
                    help="largest bandwidth transfer, MiB")
    ap.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="bandwidth transfers per direction")
    a = ap.parse_args(argv)
    endpoints, peers = load_endpoints_file(a.endpoints)
    cluster = None
    if a.cluster:
        Cluster.from_file(a.cluster)                     # validate it first
        cluster = yaml.safe_load(Path(a.cluster).read_text())
        names = [d["name"] for d in cluster["devices"]]
        extra = [n for n in endpoints if n not in names]
        if extra:
            raise EdgepartError(f"endpoints name devices {extra} that are not in {a.cluster}")
        missing = [n for n in names if n not in endpoints]
        if missing:
            raise EdgepartError(f"devices {missing} of {a.cluster} have no endpoint to probe")
        endpoints = {n: endpoints[n] for n in names}        # the cluster's order
    try:
        opts = check_probe_options({"pings": a.pings, "seconds": a.seconds, "repeats": a.repeats,
                                    "max_bytes": int(a.max_mb * (1 << 20))})
    except ValueError as e:
        ap.error(str(e))
    print(f"{'from':>10} {'to':>10} {'Mbit/s':>9} {'RTT ms':>8} {'msg µs':>8}")
    results = probe(endpoints, read_key(a.key_file), peers, options=opts,
                    progress=lambda r: print(f"{r['a']:>10} {r['b']:>10} {r['bandwidth_mbps']:9.3g} "
                                             f"{r['rtt_ms']:8.3f} {r['overhead_us']:8.1f}", flush=True))
    out = cluster_from_probe(results, endpoints, cluster)
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    Cluster.from_file(path)                              # what we wrote must load
    print(f"wrote {path}: {len(out['links']['overrides'])} link(s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
