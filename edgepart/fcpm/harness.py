"""The timing harness: timings that repeat on a shared machine.

Two timings of the same job taken the old way (an unpinned thread, all repeats of one job in a
row, whatever job came before) agreed within ±10 % for only a third to a half of the jobs of a
set on a busy host (issue #20). The harness removes the causes it can control:

* **one core.** :func:`pinned_thread` pins the calling thread (and sets one torch thread) to one
  core — :func:`timing_core`: ``$EDGEPART_TIMING_CPU``, else the last core this process may use
  (the one ``/work/bin/measure`` keeps quiet on the lab machine) — and restores both after. An
  unpinned thread migrates between cores and finds its caches cold after every move;
* **a fixed predecessor.** Every :class:`Unit` is visited in the same order in every pass, and
  what ran just before each timed call is fixed by the unit and recorded with its estimate
  (``pred``): an :class:`Isolated` job's timed calls follow untimed calls of itself ("itself
  (warm)"); a :class:`Stage`'s layers follow the stage's previous layer, its first layer the
  stage's last one (an untimed run of the stage opens every visit);
* **interleaved passes.** A pass takes one sample of every unit still short of its target; the
  samples of a job are spread over the whole measurement instead of taken in one burst, so a slow
  minute of the machine shifts every job a little instead of a few jobs a lot;
* **repeat to a target.** A job's estimate is the median of its samples, its uncertainty the
  relative standard error of that median (from the median absolute deviation). Passes go on
  until every job is at ``target_rse`` with at least ``min_samples`` samples, or the time budget
  is spent (then the estimate says ``converged=False``): bounded time, always;
* **time, not samples, shared out** (``time_share=True``). By default every unit still short of its
  target takes one sample per pass, so a 40 µs layer gets no more samples than a 4 ms one and stays
  noisy when the budget ends. With ``time_share`` a unit is visited in a pass only while the timed
  seconds it has taken are within an equal share of the chunk's time so far (the time of units
  already at their target given back to the others): each unit gets the same time, so a short one
  takes many more samples, and ``max_samples=None`` drops the count cap altogether.

* **many heap layouts** (``shuffle_heap``, on by default). Where a stage's activations land in the
  heap decides part of a short layer's time (cache sets and 4 KiB aliasing between the tensors it
  reads and writes), and the heap's state is whatever the jobs before left: the same stage timed
  in two rounds of one process can shift all its short layers together, far beyond sampling
  noise (``benchmarks/results/fcpm_accuracy.md``). A :class:`HeapShuffle` changes the heap before
  every visit (blocks of random size taken and given back, untouched), so the tensors a visit
  allocates land somewhere else each time and a job's estimate is its median over many layouts —
  the figure a worker, which lands on one layout it cannot choose, should expect.

Units are built lazily and in memory-bounded chunks (``max_bytes``: a VGG-16 classifier layer
holds 400 MB); the passes interleave within a chunk. :func:`agreement` compares two runs of the
harness (the re-timing agreement the accuracy benchmark reports as the harness's repeatability).

What the harness cannot control is the host: on a shared machine every job of a run can come out
5–12 % slower than the same jobs a minute earlier (issue #20). With ``reference=True`` a
:class:`Reference` — two fixed kernels, one bound by the core, one by the shared cache and memory —
is timed every ``ref_every_s`` seconds throughout the run; each estimate keeps the reference timed
around its samples (``Estimate.ref``) and its samples relative to it (``Estimate.rel``), so two runs
can be compared with the host's drift taken out (:func:`drift_corrected`).
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from edgepart.runtime.allocator import keep_freed_memory

TIMING_CPU_ENV = "EDGEPART_TIMING_CPU"


# --------------------------------------------------------------------------- pinning

def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover — not Linux
        return []


def timing_core(cpuset: Sequence[int] | None = None) -> int | None:
    """The core a timing thread is pinned to: ``$EDGEPART_TIMING_CPU`` if set (and allowed), else the
    last core of ``cpuset`` (e.g. where the test bed's workers run) or of the cores this process may use.
    None where affinity cannot be set (not Linux)."""
    cpus = sorted(cpuset) if cpuset else allowed_cpus()
    if not cpus:
        return None
    env = os.environ.get(TIMING_CPU_ENV, "").strip()
    if env:
        try:
            want = int(env)
        except ValueError:
            raise ValueError(f"${TIMING_CPU_ENV} must be a CPU number, got {env!r}") from None
        if want not in cpus:
            raise ValueError(f"${TIMING_CPU_ENV}={want} is not among the CPUs this process may use {cpus}")
        return want
    return cpus[-1]


@contextmanager
def pinned_thread(cpu: int | None = None, cpuset: Sequence[int] | None = None) -> Iterator[int | None]:
    """Pin the calling thread to one core (``cpu``, else :func:`timing_core` of ``cpuset``) with one torch
    thread; both are restored on exit. Yields the core (None: pinning is not available here).

    Only the calling thread moves (Linux affinity is per thread): a worker's other threads keep theirs.
    """
    if cpu is None:
        cpu = timing_core(cpuset)
    old_threads = torch.get_num_threads()
    old_aff = None
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        old_aff = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(0, {int(cpu)})
        except OSError as e:
            raise ValueError(f"cannot pin the timing thread to CPU {cpu}: {e}") from None
    try:
        torch.set_num_threads(1)
        yield cpu
    finally:
        torch.set_num_threads(old_threads)
        if old_aff is not None:
            os.sched_setaffinity(0, old_aff)


# --------------------------------------------------------------------------- estimates

def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def rse_of_median(xs: Sequence[float]) -> float:
    """Relative standard error of the median of ``xs``: 1.253 × 1.483 × MAD / √n / median (inf below 3)."""
    n = len(xs)
    if n < 3:
        return math.inf
    m = median(xs)
    if m <= 0:
        return math.inf
    mad = median([abs(x - m) for x in xs])
    return 1.2533 * 1.4826 * mad / math.sqrt(n) / m


@dataclass
class Estimate:
    """One job's timing: ``t`` the median of its samples (seconds), ``rse`` that median's relative
    standard error, ``n`` samples, ``pred`` what ran just before each timed call.

    With a :class:`Reference` (else both None): ``ref`` {kind: the median of the reference times around
    this job's samples (s)}, ``rel`` {kind: the median of sample ÷ reference time around it} — the job's
    time in units of the host's speed at the moment each sample was taken."""
    t: float
    rse: float
    n: int
    t_min: float
    pred: str
    converged: bool
    samples: list[float] = field(default_factory=list, repr=False)
    ref: dict[str, float] | None = None
    rel: dict[str, float] | None = None
    mean: float | None = None      # the samples' mean (what a sum of jobs run one after another adds up to)
    spent: float | None = None     # timed seconds the harness spent on this job's unit (all its visits)

    def to_json(self) -> dict:
        d = {"t": self.t, "rse": self.rse if math.isfinite(self.rse) else None, "n": self.n,
             "t_min": self.t_min, "pred": self.pred, "converged": self.converged}
        if self.ref is not None:
            d["ref"], d["rel"] = dict(self.ref), dict(self.rel or {})
        if self.mean is not None:
            d["mean"] = self.mean
        if self.spent is not None:
            d["spent"] = self.spent
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Estimate":
        return cls(float(d["t"]), math.inf if d.get("rse") is None else float(d["rse"]), int(d["n"]),
                   float(d.get("t_min", d["t"])), str(d.get("pred", "?")), bool(d.get("converged", False)),
                   ref=d.get("ref"), rel=d.get("rel"), mean=d.get("mean"), spent=d.get("spent"))


# --------------------------------------------------------------------------- the host's speed

REFERENCE_KINDS = ("compute", "memory")


class Reference:
    """Two fixed kernels that measure the host's speed at a moment, timed throughout a harness run.

    * ``compute``: a 3×3 convolution, 32 → 32 channels on 28×28 (weights and input fit the core's L2):
      bound by the core's clock and whatever shares the core;
    * ``memory``: the sum of two 1 Mi-float (4 MiB) tensors into a third, beyond any core's L2: bound by
      the shared cache and memory bandwidth, which the other cores' work takes a share of.

    A sample is the median of ``reps`` timed calls after one untimed call (so the job before it does
    not decide whether the reference finds its data in cache). Deterministic inputs (fixed seed).
    ``kernels``: {kind: zero-argument callable} instead of these two (tests)."""

    def __init__(self, reps: int = 3, kernels: dict[str, Callable[[], Any]] | None = None):
        self.reps = reps
        self.kernels = kernels

    def build(self) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 32, 28, 28, generator=g)
        w = torch.randn(32, 32, 3, 3, generator=g)
        a, b = torch.randn(1 << 20, generator=g), torch.randn(1 << 20, generator=g)
        self.kernels = {"compute": lambda: torch.nn.functional.conv2d(x, w, padding=1),
                        "memory": lambda: torch.add(a, b)}

    def sample(self, clock: Callable[[], float]) -> dict[str, float]:
        if self.kernels is None:
            self.build()
        out = {}
        for kind, fn in self.kernels.items():
            fn()
            ts = []
            for _ in range(self.reps):
                t0 = clock()
                fn()
                ts.append(clock() - t0)
            out[kind] = median(ts)
        return out


# --------------------------------------------------------------------------- units

class Unit:
    """Something the harness visits once per pass; a visit returns ``{job key: one sample (s)}``."""
    keys: list
    preds: dict
    bytes: int = 0

    def build(self) -> None:
        """Allocate what the visits need (called once, just before the unit's chunk is timed)."""

    def release(self) -> None:
        """Free it (called when the chunk is done)."""

    def visit(self, clock: Callable[[], float], target_s: float) -> dict:
        raise NotImplementedError


class Isolated(Unit):
    """A job timed alone and warm: each visit makes untimed warm-up calls, then times a burst of calls
    (about ``target_s`` in all, 1..``max_burst``) and gives the burst's median as the sample.
    ``make()`` returns the zero-argument callable; ``nbytes``: its tensors' size, for chunking."""

    def __init__(self, key, make: Callable[[], Callable[[], Any]], nbytes: int = 0, max_burst: int = 25):
        self.keys, self.preds = [key], {key: "itself (warm)"}
        self.make, self.bytes, self.max_burst = make, int(nbytes), max_burst
        self.fn: Callable | None = None
        self._est = None

    def build(self) -> None:
        self.fn = self.make()

    def release(self) -> None:
        self.fn = None

    def visit(self, clock, target_s):
        fn = self.fn
        t0 = clock()
        fn()
        first = clock() - t0
        if self._est is None or first < 0.02:    # a second warm call unless the job is long
            t0 = clock()
            fn()
            first = clock() - t0
        est = self._est = first if self._est is None else min(self._est, first)
        n = max(1, min(self.max_burst, int(target_s / max(est, 1e-7))))
        ts = []
        for _ in range(n):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
        return {self.keys[0]: median(ts)}


class Stage(Unit):
    """Layers run one after another, as a stage runs them, with a timer around each layer.

    ``make()`` returns ``(steps, first_input)``: ``steps`` a list of ``(name, key, prep)`` in
    execution order, where ``prep(env) -> (callable, args, kwargs)`` prepares one step's call from
    the values so far (``env[name]``; ``env[None]`` is ``first_input``) — untimed — and the call is
    timed if ``key`` is not None (a job of this unit; steps without a key, e.g. a graph's inputs,
    run untimed). ``keys``: the timed steps' keys, in order. A visit runs the stage once untimed
    (so the first layer's predecessor is always the stage's last layer, as in a worker running it
    request after request), then ``runs`` timed runs (about ``target_s`` in all, at most
    ``max_runs``); each layer's sample is its median over those runs. A stage whose opening run takes
    ``long_s`` or more (a whole model: one timed run per visit) also counts the opening run's layers
    after the first: each follows the same layer as in every run, and what ran before the stage is
    long out of cache by then — twice the samples for the same time. ``total_key``: also a sample
    of the whole stage (the sum of its timed layers, timed runs only), if not None."""

    def __init__(self, keys: list, make: Callable[[], tuple[list, Any]], nbytes: int = 0, total_key=None,
                 max_runs: int = 10, names: list[str] | None = None, long_s: float = 0.02):
        self.layer_keys = list(keys)
        self.total_key = total_key
        self.keys = self.layer_keys + ([total_key] if total_key is not None else [])
        names = names or [str(k) for k in keys]
        self.preds = {k: (names[i - 1] if i else f"{names[-1]} (the stage's previous run)")
                      for i, k in enumerate(self.layer_keys)}
        if total_key is not None:
            self.preds[total_key] = "the stage itself (previous run)"
        self.make, self.bytes, self.max_runs, self.long_s = make, int(nbytes), max_runs, long_s
        self.steps = None
        self.x0 = None
        self.last = None      # the last step's value of the latest run (tests check the stage computes the model)
        self._est = None

    def build(self) -> None:
        self.steps, self.x0 = self.make()
        timed = [key for _, key, _ in self.steps if key is not None]
        if timed != self.layer_keys:
            raise ValueError("a Stage's steps must time exactly its keys, in order")

    def release(self) -> None:
        self.steps, self.x0, self.last = None, None, None

    def _run(self, clock) -> list[float]:
        env: dict = {None: self.x0}
        out = []
        for name, key, prep in self.steps:
            fn, args, kwargs = prep(env)
            if key is None:
                env[name] = fn(*args, **kwargs)
                continue
            t0 = clock()
            y = fn(*args, **kwargs)
            out.append(clock() - t0)
            env[name] = y
        self.last = env[name]
        return out

    def visit(self, clock, target_s):
        opening = self._run(clock)
        first = sum(opening)
        est = self._est = first if self._est is None else min(self._est, first)
        runs = max(1, min(self.max_runs, int(target_s / max(est, 1e-7))))
        per = [self._run(clock) for _ in range(runs)]
        use_opening = first >= self.long_s
        sample = {k: median([p[i] for p in per] + ([opening[i]] if use_opening and i else []))
                  for i, k in enumerate(self.layer_keys)}
        if self.total_key is not None:
            sample[self.total_key] = median([sum(p) for p in per])
        return sample


# --------------------------------------------------------------------------- heap layouts

class HeapShuffle:
    """A pool of ``blocks`` heap blocks of random size (64 bytes to ``max_bytes``) that :meth:`__call__`
    partly renews: half the pool, chosen at random, is given back and taken again in new sizes. The tensors
    allocated next (a stage's activations, a job's output) then come from a different part of the heap than
    after the previous call. The blocks are never written (``torch.empty``): the pool costs address space,
    not resident memory. Deterministic in ``seed``; :meth:`close` frees the pool."""

    def __init__(self, blocks: int = 64, max_bytes: int = 4 << 20, seed: int = 0):
        if blocks < 1 or max_bytes < 64:
            raise ValueError(f"HeapShuffle needs at least one block of 64 bytes or more, got {blocks} × {max_bytes}")
        self.blocks, self.max_bytes = int(blocks), int(max_bytes)
        self._rng = random.Random(seed)
        self._pool: list[torch.Tensor | None] = [None] * self.blocks

    def __call__(self) -> None:
        for j in self._rng.sample(range(self.blocks), max(1, self.blocks // 2)):
            self._pool[j] = None
        for j, b in enumerate(self._pool):
            if b is None:
                # half the sizes log-uniform from 64 bytes (small freed chunks are taken too), half uniform
                # (so are the large ones a stage's activations leave)
                lo, hi = 16, self.max_bytes // 4
                n = (self._rng.randint(lo, hi) if self._rng.random() < 0.5
                     else int(math.exp(self._rng.uniform(math.log(lo), math.log(hi)))))
                self._pool[j] = torch.empty(n, dtype=torch.float32)

    def held_bytes(self) -> int:
        """Bytes the pool holds now (address space; never touched)."""
        return sum(4 * b.numel() for b in self._pool if b is not None)

    def close(self) -> None:
        self._pool = [None] * self.blocks


# --------------------------------------------------------------------------- the harness

@dataclass
class Harness:
    """Interleaved passes over units until every job's median is at ``target_rse`` (with at least
    ``min_samples`` samples) or ``budget_s`` is spent. ``sample_s``: timed seconds per sample of a
    unit; ``max_bytes``: the units of one chunk (timed together, interleaved) hold at most this much;
    ``clock``: wall time by default, ``time.thread_time`` on a rate-limited device.

    ``max_samples``: a job with this many samples counts as done (None: no count cap). ``time_share``:
    share the chunk's time equally among its units instead of visiting each once per pass (see the
    module's docstring): a unit that has taken more than its share so far (measured with ``clock``)
    sits out passes until the others catch up; a unit short of ``min_samples`` never does."""
    target_rse: float = 0.01
    min_samples: int = 5
    max_samples: int | None = 60
    time_share: bool = False
    budget_s: float = 60.0
    sample_s: float = 0.002
    max_bytes: int = 1 << 30
    clock: Callable[[], float] = time.perf_counter
    on_pass: Callable[[int, int], None] | None = None    # (samples taken so far, units) after each visit
    reference: bool | Reference = False    # time a Reference throughout (True: the default one)
    ref_every_s: float = 0.2               # ... before a visit once this much wall time has passed since the last
    reference_log: list = field(default_factory=list, init=False, repr=False)   # [(s since start, {kind: s})]
    failures: list = field(default_factory=list, init=False, repr=False)   # [(unit's first key, error)] left out
    shuffle_heap: bool | HeapShuffle = True   # a new heap layout before every visit (True: the default HeapShuffle)

    def chunks(self, units: list[Unit]) -> list[list[Unit]]:
        out, cur, size = [], [], 0
        for u in units:
            if cur and size + u.bytes > self.max_bytes:
                out.append(cur)
                cur, size = [], 0
            cur.append(u)
            size += u.bytes
        if cur:
            out.append(cur)
        return out

    def run(self, units: list[Unit]) -> dict[Any, Estimate]:
        """Time ``units`` (in the calling thread: pin it first, :func:`pinned_thread`); returns
        ``{job key: Estimate}``. A unit that fails to build or run is left out (its keys absent) and named,
        with the error, in ``self.failures``."""
        keep_freed_memory()
        samples: dict[Any, list[float]] = {}
        segs: dict[Any, list[int]] = {}      # per sample: the index of the last reference timed before it
        preds: dict[Any, str] = {}
        t_start = time.perf_counter()
        chunks = self.chunks(units)
        visits = 0
        ref = Reference() if self.reference is True else (self.reference or None)
        log = self.reference_log = []
        self.failures = []
        last_ref = [-math.inf]
        spent_of: dict[Any, float | None] = {}
        shuffle = HeapShuffle() if self.shuffle_heap is True else (self.shuffle_heap or None)

        def time_reference(force: bool = False) -> None:
            now = time.perf_counter()
            if ref is not None and (force or now - last_ref[0] >= self.ref_every_s):
                log.append((now - t_start, ref.sample(self.clock)))
                last_ref[0] = time.perf_counter()
        with torch.inference_mode():
            for ci, chunk in enumerate(chunks):
                left = max(0.0, self.budget_s - (time.perf_counter() - t_start))
                share = left * len(chunk) / max(1, sum(len(c) for c in chunks[ci:]))
                deadline = time.perf_counter() + share
                c_start = self.clock()
                spent: dict[int, float] = {}      # id(unit) -> seconds (self.clock) its visits took
                live = []
                for u in chunk:
                    try:
                        u.build()
                        live.append(u)
                    except Exception as e:  # noqa: BLE001 — a job this backend cannot build: no estimate
                        self.failures.append((u.keys[0] if u.keys else None, f"cannot build: {type(e).__name__}: {e}"))
                        continue
                    for k in u.keys:
                        samples.setdefault(k, [])
                        preds[k] = u.preds.get(k, "?")
                done: dict[int, bool] = {}        # id(unit) -> at its target (re-checked after each visit)
                while live:
                    todo = [u for u in live if not done.setdefault(id(u), self._done(u, samples))]
                    if not todo:
                        break
                    # the minimum samples are taken even past the deadline, up to twice the chunk's share
                    short = any(len(samples[k]) < self.min_samples for u in todo for k in u.keys)
                    now = time.perf_counter()
                    if now > deadline + share or (now > deadline and not short):
                        break
                    finished = sum(spent.get(id(u), 0.0) for u in live if u not in todo)
                    least = min(todo, key=lambda u: spent.get(id(u), 0.0))     # visited in every pass: progress
                    for u in todo:
                        if self.time_share and u is not least and not self._short(u, samples):
                            # the equal share of the chunk's time so far, what finished units took given back
                            fair = (self.clock() - c_start - finished) / len(todo)
                            if spent.get(id(u), 0.0) > fair:
                                continue
                        time_reference()
                        if shuffle is not None:
                            shuffle()
                        try:
                            c0 = self.clock()
                            got = u.visit(self.clock, self.sample_s)
                            spent[id(u)] = spent.get(id(u), 0.0) + self.clock() - c0
                        except Exception as e:  # noqa: BLE001 — failed mid-run: drop the unit
                            self.failures.append((u.keys[0] if u.keys else None, f"failed: {type(e).__name__}: {e}"))
                            live.remove(u)
                            for k in u.keys:
                                samples.pop(k, None)
                            continue
                        for k, v in got.items():
                            samples[k].append(v)
                            segs.setdefault(k, []).append(len(log) - 1)
                        done[id(u)] = self._done(u, samples)
                        visits += 1
                        if self.on_pass:
                            self.on_pass(visits, len(units))
                for u in chunk:
                    for k in u.keys:
                        spent_of[k] = spent.get(id(u))
                    u.release()
                time_reference(force=True)      # closes the last samples' bracket
        out = {}
        for k, xs in samples.items():
            if not xs:
                continue
            r = rse_of_median(xs)
            e = Estimate(median(xs), r, len(xs), min(xs), preds.get(k, "?"),
                         len(xs) >= self.min_samples and r <= self.target_rse, list(xs),
                         mean=sum(xs) / len(xs), spent=spent_of.get(k))
            if ref is not None and log:
                around = [_bracket(log, j) for j in segs.get(k, [])]
                e.ref = {kind: median([a[kind] for a in around]) for kind in log[0][1]}
                e.rel = {kind: median([x / a[kind] for x, a in zip(xs, around)]) for kind in log[0][1]}
            out[k] = e
        return out

    def _short(self, u: Unit, samples: dict) -> bool:
        return any(len(samples.get(k, ())) < self.min_samples for k in u.keys)

    def _done(self, u: Unit, samples: dict) -> bool:
        for k in u.keys:
            xs = samples.get(k, [])
            if self.max_samples is not None and len(xs) >= self.max_samples:
                continue
            if len(xs) < self.min_samples or rse_of_median(xs) > self.target_rse:
                return False
        return True


def _bracket(log: list, j: int) -> dict[str, float]:
    """The reference around a sample taken after reference ``j``: the geometric mean of reference ``j``
    and the next one (the one before the first reference, if it came first)."""
    j = max(0, j)
    a = log[j][1]
    if j + 1 >= len(log):
        return a
    b = log[j + 1][1]
    return {kind: math.sqrt(a[kind] * b[kind]) for kind in a}


def drift_corrected(runs: Sequence[dict], kind_of: Callable[[Any], str] = lambda key: "compute",
                    level: str = "run") -> list[dict]:
    """The estimates of several runs of the same jobs ({key: Estimate}, with a Reference) on one common scale,
    with the host's drift between them taken out. Returns one {key: seconds} per run.

    ``level="run"`` (default): each run's estimates × (typical reference ÷ that run's median reference), the
    reference ``kind_of(key)``'s, typical = the geometric mean of the runs' medians — a shift of the whole
    host between runs is removed, nothing else. ``level="sample"``: each job's ``rel`` (every sample against
    the reference timed around it) × the typical reference — also removes drift within a run, but adds the
    reference's own noise to every job. Jobs without reference timings keep their ``t``."""
    if level not in ("run", "sample"):
        raise ValueError(f"level must be 'run' or 'sample', not {level!r}")
    run_med = [{kind: median([e.ref[kind] for e in run.values() if e.ref and kind in e.ref])
                for kind in {kd for e in run.values() for kd in (e.ref or {})}} for run in runs]
    logs: dict[str, list[float]] = {}
    for m in run_med:
        for kind, v in m.items():
            logs.setdefault(kind, []).append(math.log(v))
    if level == "sample":
        logs = {}
        for run in runs:
            for e in run.values():
                for kind, v in (e.ref or {}).items():
                    logs.setdefault(kind, []).append(math.log(v))
    scale = {kind: math.exp(sum(v) / len(v)) for kind, v in logs.items()}
    out = []
    for run, med in zip(runs, run_med):
        cur = {}
        for k, e in run.items():
            kind = kind_of(k)
            if kind not in scale or not e.ref:
                cur[k] = e.t
            elif level == "sample":
                cur[k] = e.rel[kind] * scale[kind]
            else:
                cur[k] = e.t * scale[kind] / med[kind]
        out.append(cur)
    return out


def reference_drift(runs: Sequence[dict]) -> dict[str, list[float]]:
    """{kind: each run's median reference time ÷ the first run's}: the host-wide drift between runs that
    :func:`drift_corrected` removes (1.05: the host was 5 % slower in that run)."""
    out: dict[str, list[float]] = {}
    meds = [{kind: median([e.ref[kind] for e in run.values() if e.ref]) for kind in REFERENCE_KINDS
             if any(e.ref and kind in e.ref for e in run.values())} for run in runs]
    for kind in meds[0] if meds else {}:
        out[kind] = [m.get(kind, float("nan")) / meds[0][kind] for m in meds]
    return out


def agreement(a: dict, b: dict, keys=None, tol: float = 0.10) -> float:
    """Share of the jobs in both ``a`` and ``b`` ({key: Estimate or seconds}) whose two timings agree within
    ±``tol`` (|a/b − 1| ≤ tol): the re-timing agreement, the ceiling for any model's ±10 % accuracy."""
    def t(v):
        return v.t if isinstance(v, Estimate) else float(v)
    ks = [k for k in (a if keys is None else keys) if k in a and k in b]
    if not ks:
        return float("nan")
    return sum(abs(t(a[k]) / t(b[k]) - 1) <= tol for k in ks) / len(ks)
