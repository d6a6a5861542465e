"""Run an MCIA plan for real: every task's chosen version, cuts and shares on the tiered emulated testbed.

    run = MciaRun(cluster, tasks, levels, time_scale=None, cpuset=[1])    # plans (MILP), compiles, deploys
    report = run.measure(requests=10, inputs=images, labels=labels)       # all tasks at once
    print(report.table())
    run.update(new_tasks)           # re-solve; only tasks whose choice changed are redeployed
    run.update(run.tasks, cluster=live)     # the cluster changed (an uplink, the edge's load): re-solve
    y = run.infer("cam0", x)        # one request; waits while the task is being switched to new workers
    run.close()

For each task the plan's choice (version v, cuts k1 <= k2, edge share a/L, uplink share b/L) becomes a
bundle of version v compiled with a fixed vertical plan — the nodes before legal cut k1 on the task's
end device, k1..k2 on the edge server, the rest in the cloud — for the three-device cluster (end,
edge, cloud) whose source is the end device. :class:`edgepart.testbed.tiered.TieredTestbed` runs it:
one worker per task on each device its plan uses, the edge process dilated to the task's share
a/L of the edge server, the task's packets in an htb class of b/L of its uplink.

:meth:`MciaRun.measure` sends every task's requests from its own thread, all tasks at once, one
request in flight per task (so there is no queueing, as in the MILP's latency), and reports per task
the predicted latency (the plan's ``Outcome.latency_s``), the measured median (wall time × the
testbed's time scale), the largest difference of any output from the version's own single-device
output (relative to that output's largest magnitude), the version's test-split accuracy (its version
set record) and the top-1 accuracy of the answers it got.

:meth:`MciaRun.update` re-solves for new tasks and/or a changed cluster (the planner's view: an
uplink's bandwidth, the edge server's speed × (1 − load), the WAN — not the testbed's links, which
:meth:`TieredTestbed.set_link` changes) and redeploys only what changed, make before break: a task
whose version or cuts change gets new workers beside its old ones and is switched between two of its
requests (:meth:`MciaRun.request` holds the task's lock), so serving goes on while it applies.
:class:`edgepart.mcia.online.MciaController` calls it while tasks are served.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgepart import datasets
from edgepart.cluster import Cluster
from edgepart.compiler.planning.plan import Plan, Stage, compute_nodes
from edgepart.errors import EdgepartError
from edgepart.mcia.build import build_table, legal_cuts
from edgepart.mcia.scenario import Task, Tiers
from edgepart.mcia.solve import Solution
from edgepart.compiler.cost.model import CostModel
from edgepart.mcia.table import Choice, TaskTable, reference_latency, rescale, uses
from edgepart.passes import analyse
from edgepart.passes.trace import trace
from edgepart.runtime.client import Session
from edgepart.runtime.worker import serve
from edgepart.testbed.tiered import TieredTestbed, fit_time_scale
from edgepart.versions import VersionSet

EXACT_TOL = 1e-4         # max |partitioned − single-device| / max |single-device|


def task_cluster(cluster: Cluster, tiers: Tiers, end: str) -> Cluster:
    """The three-device cluster (end, edge, cloud) of one task's bundle, its source the end device."""
    keep = {end, tiers.edge.name} | ({tiers.cloud.name} if tiers.cloud else set())
    d = cluster.to_dict()
    d["devices"] = [dev for dev in d["devices"] if dev["name"] in keep]
    d["links"]["overrides"] = [o for o in d["links"]["overrides"] if o["a"] in keep and o["b"] in keep]
    d["source"] = end
    d["shared_medium"] = False
    return Cluster.from_dict(d)


class _StageCpu:
    """A worker's stage clock that records each compute stage's thread CPU time (what a dilated testbed
    worker stretches, testbed.cpu.CpuDilation) and does not stretch it."""

    def __init__(self):
        self.cpu: list[float] = []

    def stretch(self, t0: float, c0: float) -> float:
        self.cpu.append(time.thread_time() - c0)
        return time.perf_counter() - t0


def version_cpu_s(vs: VersionSet, name: str, cpuset: list[int] | None = None, runs: int = 30,
                  warmup: int = 5, gap_s: float = 0.02) -> float:
    """Median thread CPU seconds of the compute stage of version ``name`` compiled for one device, run by a
    real worker (in this process, over loopback, pinned to ``cpuset``) the way the testbed runs it: one
    request at a time after ``gap_s`` idle, during which other work (here: writing 8 MB) evicts the caches
    as the testbed's other workers on the same CPU do. Worker stages cost more CPU than a warm in-process
    loop (message handling, cold caches: benchmarks/results/stage_start.md), and that is what the
    emulation dilates."""
    bundle = vs.compile(name, Cluster.homogeneous(1), strategy="single")
    _, x = vs.model(name)
    tmp = tempfile.mkdtemp(prefix="edgepart-mcia-cal-")
    clock, key = _StageCpu(), os.urandom(32)
    junk = torch.empty(2 * 2 ** 20)
    old = os.sched_getaffinity(0)
    try:
        bundle.save(tmp)
        if cpuset:
            # the worker's threads inherit this thread's affinity when it starts them; and this thread stays
            # there, so that its writes evict the caches of the CPU the worker computes on
            os.sched_setaffinity(0, cpuset)
        worker = serve("127.0.0.1:0", key, threads=1, stage_clock=clock)
        try:
            with Session(tmp, {bundle.manifest.source_device: worker.address}, key) as s:
                for _ in range(warmup + runs):
                    junk.add_(1.0)
                    time.sleep(gap_s)
                    s.infer(x)
        finally:
            worker.stop()
    finally:
        os.sched_setaffinity(0, old)
        shutil.rmtree(tmp, ignore_errors=True)
    if len(clock.cpu) < warmup + runs:
        raise EdgepartError(f"version {name!r}: the calibration worker timed {len(clock.cpu)} stages, expected "
                            f"{warmup + runs}")
    return statistics.median(clock.cpu[-runs:])


def calibrate_table(table: TaskTable, vs: VersionSet, cluster: Cluster, cpuset: list[int] | None = None,
                    cache: dict | None = None) -> TaskTable:
    """The table with each version's compute times × (its single-device stage's CPU time in a worker on this
    host, :func:`version_cpu_s`, ÷ the cost model's prediction of it on a device of speed 1 with the task's
    end device's profile). Exact for plans that run a version whole on one tier; a split plan's per-stage
    costs are spread over its nodes in proportion (approximate).

    For an emulated testbed whose devices' profiles describe this host: the FCPM profile predicts small
    versions' layers too slowly (vgg_small at scale 0.25: about 2× its measured time here), and the MILP's
    latencies are only as good as its compute times. One factor per version keeps the profile's split
    of time between layers."""
    cache = {} if cache is None else cache
    ref = Cluster([dataclasses.replace(cluster.device(table.task.source), name="ref", speed=1.0, tier=None)])
    cost = CostModel(ref)
    versions = []
    for v in table.versions:
        key = (str(vs.dir), v.name)
        if key not in cache:
            model, x = vs.model(v.name)
            gm = trace(model, (x,))
            analyse(gm, ref)
            predicted = sum(cost.compute_time(n, "ref") for n in compute_nodes(gm))
            cache[key] = version_cpu_s(vs, v.name, cpuset) / predicted
        f = cache[key]
        versions.append(dataclasses.replace(v, end_s=tuple(t * f for t in v.end_s), edge_s=tuple(t * f for t in v.edge_s),
                                            cloud_s=tuple(t * f for t in v.cloud_s)))
    full = max(versions, key=lambda v: v.param_bytes[-1])
    return TaskTable(table.task, tuple(versions), reference_latency(full))


def choice_plan(model, x, choice: Choice, cluster: Cluster, tiers: Tiers, end: str) -> Plan:
    """The vertical plan of a choice: nodes before legal cut k1 on ``end``, k1..k2 on the edge, the rest in
    the cloud (cut indices as in the task's cost table, edgepart.mcia.build.legal_cuts)."""
    gm = trace(model, (x,))
    analyse(gm, cluster)
    cuts = [c for c, _, _ in legal_cuts(gm)]
    if choice.k2 >= len(cuts):
        raise EdgepartError(f"choice {choice} names cut {choice.k2}, the version has {len(cuts)} legal cuts")
    names = [n.name for n in compute_nodes(gm)]
    c1, c2 = cuts[choice.k1], cuts[choice.k2]
    stages = [Stage("whole", part, device=dev) for part, dev in
              ((names[:c1], end), (names[c1:c2], tiers.edge.name),
               (names[c2:], tiers.cloud.name if tiers.cloud else None)) if part]
    return Plan(stages, "mcia", chosen="mcia")


@dataclass
class TaskRun:
    """One task as deployed: its choice, bundle and the reference model of its version."""
    table: TaskTable
    choice: Choice
    bundle_dir: Path
    model: torch.nn.Module
    accuracy: float                                 # its version's test-split accuracy (version set record)
    nodes: tuple[int, int, int]                     # compute nodes on the end device, the edge, the cloud


@dataclass
class TaskResult:
    task: str
    source: str
    version: str
    cuts: str                                       # "end|edge|cloud" node counts
    edge_share: int
    up_share: int
    predicted_ms: float
    measured_ms: float                              # median, emulated time
    max_rel_diff: float                             # vs the version's single-device output
    accuracy: float                                 # the version's test-split accuracy
    answered_accuracy: float                        # top-1 of the answers measured here
    requests: int
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def error(self) -> float:
        return self.measured_ms / self.predicted_ms - 1.0

    @property
    def exact(self) -> bool:
        return self.max_rel_diff <= EXACT_TOL


@dataclass
class RunReport:
    results: list[TaskResult]
    time_scale: float
    levels: int
    objective: float
    gap: float

    @property
    def median_error(self) -> float:
        """Median over tasks of (measured median ÷ predicted − 1)."""
        return statistics.median(r.error for r in self.results)

    @property
    def all_exact(self) -> bool:
        return all(r.exact for r in self.results)

    def table(self) -> str:
        lines = ["| task | end device | version | nodes end/edge/cloud | edge share | uplink share | predicted ms "
                 "| measured ms | error | max rel diff | test accuracy | answers correct |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.results:
            share = (lambda s: f"{s}/{self.levels}" if s else "—")
            lines.append(f"| {r.task} | {r.source} | {r.version} | {r.cuts} | {share(r.edge_share)} | "
                         f"{share(r.up_share)} | {r.predicted_ms:.1f} | {r.measured_ms:.1f} | {r.error * 100:+.1f} % | "
                         f"{r.max_rel_diff:.1e} | {r.accuracy * 100:.1f} % | {r.answered_accuracy * 100:.0f} % "
                         f"({r.requests}) |")
        return "\n".join(lines)


@dataclass
class UpdateReport:
    added: list[str]
    removed: list[str]
    redeployed: list[str]              # version or cuts changed: new bundle, new workers
    reshared: list[str]                # only shares changed: dilation / htb class changed in place
    unchanged: list[str]
    solution: Solution


class _Switch:
    """The moment a redeployed task changes workers: with its request lock held, ``then`` runs."""

    def __init__(self, lock: threading.Lock, then):
        self.lock, self.then = lock, then

    def __enter__(self):
        if not self.lock.acquire(timeout=300):
            raise EdgepartError("a task's request did not finish within 300 s; not switched")
        self.then()

    def __exit__(self, *exc):
        self.lock.release()


class MciaRun:
    """An MCIA plan deployed on the tiered testbed (module docstring). ``strategy``: milp or a baseline
    (edgepart.mcia.plan); ``time_scale``: None fits every task's processes into ``headroom`` of the
    ``cpuset``'s CPUs; ``host_speed``: this CPU now ÷ the one the cluster's speeds refer to; ``calibrate``:
    scale each version's compute times to its run measured on this host (:func:`calibrate_table`; it
    measures the host as it is now, so leave ``host_speed`` at 1)."""

    def __init__(self, cluster: Cluster, tasks: list[Task], levels: int = 8, strategy: str = "milp",
                 time_scale: float | None = None, cpuset: list[int] | None = None, host_speed: float = 1.0,
                 headroom: float = 0.9, time_limit: float = 60.0, calibrate: bool = False, workdir=None, log=None):
        self.cluster = cluster              # what the plan is made for (update(cluster=...) changes it)
        self.nominal = cluster              # what the cost tables are built for; others are rescaled
        self.tiers = Tiers.from_cluster(cluster)
        self.levels = levels
        self.strategy = strategy
        self.time_limit = time_limit
        self.calibrate = calibrate
        self.cpuset = cpuset
        self.factors: dict[tuple[str, str], float] = {}     # (version set, version) -> calibration factor
        self.log = log or (lambda msg: None)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="edgepart-mcia-run-")
        self.workdir = Path(workdir or self._tmp.name)
        self.tables: dict[str, TaskTable] = {}          # per task, for self.cluster
        self._base: dict[str, TaskTable] = {}           # per task, for self.nominal
        self._locks: dict[str, threading.Lock] = {}     # per task: held by a request, and by its switch
        self._req: dict[str, tuple[int, float]] = {}    # per task: requests answered, their wall seconds
        self._req_lock = threading.Lock()
        self.sets: dict[Path, VersionSet] = {}
        self.runs: dict[str, TaskRun] = {}
        self.tasks = list(tasks)
        self.bed: TieredTestbed | None = None
        self._splits: dict[tuple, tuple] = {}
        self.solution = self._solve(self.tasks)
        if time_scale is None:
            cpus = len(cpuset) if cpuset else 1
            time_scale = fit_time_scale(self._speeds(self.solution), cpus, host_speed, headroom)
        try:
            self.bed = TieredTestbed(cluster, time_scale, host_speed=host_speed, cpuset=cpuset)
            for t, c in zip(self.tasks, self.solution.choices):
                self._start(t, c)
        except BaseException:
            self.close()
            raise

    # --- planning ------------------------------------------------------------------------------
    def _set(self, task: Task) -> VersionSet:
        if task.versions is None:
            raise EdgepartError(f"task {task.name!r}: running it needs a version set (versions: DIR)")
        path = Path(task.versions).resolve()
        if path not in self.sets:
            self.sets[path] = VersionSet.load(path)
        return self.sets[path]

    def _table(self, task: Task) -> TaskTable:
        """The task's cost table for ``self.cluster``: built (and calibrated) once for ``self.nominal``, then
        rescaled by the devices' speeds (table.rescale: exact, times are ÷ speed)."""
        t = self._base.get(task.name)
        if t is None or t.task != task:
            t = build_table(task, self.nominal, Tiers.from_cluster(self.nominal), self._set(task))
            if self.calibrate:
                t = calibrate_table(t, self._set(task), self.nominal, self.cpuset, self.factors)
            self._base[task.name] = t
        f = {d: self.nominal.device(d).speed / self.cluster.device(d).speed
             for d in (task.source, self.tiers.edge.name) + ((self.tiers.cloud.name,) if self.tiers.cloud else ())}
        t = rescale(t, f[task.source], f[self.tiers.edge.name], f[self.tiers.cloud.name] if self.tiers.cloud else 1.0)
        self.tables[task.name] = t
        return t

    def _set_cluster(self, cluster: Cluster) -> None:
        """Plan for ``cluster`` from now on: the same devices (names, tiers); speeds, links, memory may differ."""
        if sorted(cluster.names) != sorted(self.cluster.names) or \
                any(cluster.device(d).tier != self.cluster.device(d).tier for d in cluster.names):
            raise EdgepartError(f"update(cluster=...): the cluster must have the same devices and tiers as the "
                                f"running one ({sorted(self.cluster.names)}), got {sorted(cluster.names)}")
        if any(dataclasses.replace(cluster.device(d), speed=1.0) != dataclasses.replace(self.nominal.device(d), speed=1.0)
               for d in cluster.names):
            self.nominal, self._base = cluster, {}          # a profile or memory changed: tables rebuilt
        self.cluster, self.tiers = cluster, Tiers.from_cluster(cluster)

    def _solve(self, tasks: list[Task]) -> Solution:
        from edgepart.mcia import plan   # why: mcia/__init__ imports this module's siblings; plan lives there
        tables = [self._table(t) for t in tasks]
        t0 = time.perf_counter()
        sol = plan(tables, self.tiers, self.levels, self.strategy, time_limit=self.time_limit)
        self.log(f"planned {len(tasks)} tasks ({self.strategy}) in {time.perf_counter() - t0:.1f} s, "
                 f"objective {sol.objective:.4f}, gap {sol.gap:.2%}")
        if sol.violations:
            raise EdgepartError(f"the {self.strategy} plan breaks constraints: {'; '.join(sol.violations)}")
        return sol

    def _speeds(self, sol: Solution) -> list[float]:
        """Emulated speed of every process the plan starts (one per task per device it uses)."""
        out = []
        for t, c in zip(self.tasks, sol.choices):
            v = self.tables[t.name].versions[c.version]
            _, edge, cloud = uses(v, c.k1, c.k2)
            out.append(self.cluster.device(t.source).speed)
            if edge:
                out.append(self.tiers.edge.speed * c.edge_share / self.levels)
            if cloud:
                out.append(self.tiers.cloud.speed)
        return out

    # --- deployment ------------------------------------------------------------------------------
    def _start(self, task: Task, c: Choice, replace: bool = False) -> None:
        table = self.tables[task.name]
        vs = self._set(task)
        vname = table.versions[c.version].name
        model, x = vs.model(vname)
        sub = task_cluster(self.nominal, Tiers.from_cluster(self.nominal), task.source)
        plan = choice_plan(model, x, c, sub, self.tiers, task.source)
        bundle = vs.compile(vname, sub, strategy=plan)
        out = self.workdir / f"{task.name}-{vname}-{c.k1}-{c.k2}"
        bundle.save(out)
        v = table.versions[c.version]
        shares = dict(edge_share=c.edge_share / self.levels if c.k2 > c.k1 else None,
                      up_share=c.up_share / self.levels if c.k1 < v.last else None)
        tiers = (task.source, self.tiers.edge.name, self.tiers.cloud.name if self.tiers.cloud else None)
        nodes = tuple(sum(len(s.nodes) for s in plan.stages if s.device == d) for d in tiers)
        run = TaskRun(table, c, out, model, vs.records[vname].accuracy, nodes)
        lock = self._locks.setdefault(task.name, threading.Lock())
        if replace:
            self.bed.replace_task(task.name, out, swap=_Switch(lock, lambda: self.runs.__setitem__(task.name, run)),
                                  **shares)
        else:
            self.bed.add_task(task.name, task.source, out, **shares)
            self.runs[task.name] = run
        self.log(f"deployed {task.name}: {vname}, cuts {c.k1}/{c.k2}, shares {c.edge_share}/{c.up_share}")

    def update(self, tasks: list[Task], cluster: Cluster | None = None, solution: Solution | None = None) -> UpdateReport:
        """Tasks arrived or left (or changed), or the cluster did (``cluster``: the same devices and tiers with
        other speeds — e.g. the edge server's speed × (1 − load) —, links or memory; its cost tables are
        rescaled, or rebuilt if a profile changed): re-solve for ``tasks`` and change only what differs — a
        task whose version and cuts stay keeps its workers (its shares change in place), others are
        redeployed, make before break (module docstring). ``solution``: a plan already solved for exactly
        these tasks and cluster (MciaController solves off the request path), applied without solving again."""
        if cluster is not None:
            self._set_cluster(cluster)
        old = {t.name: r for t, r in zip(self.tasks, [self.runs[t.name] for t in self.tasks])}
        if solution is None:
            sol = self._solve(tasks)
        else:
            for t in tasks:
                self._table(t)
            if len(solution.choices) != len(tasks):
                raise EdgepartError(f"update: the solution has {len(solution.choices)} choices for {len(tasks)} tasks")
            sol = solution
        new = {t.name: (t, c) for t, c in zip(tasks, sol.choices)}
        rep = UpdateReport([], [], [], [], [], sol)
        for name in old:
            if name not in new:
                with _Switch(self._locks.pop(name), lambda: None):      # not while one of its requests runs
                    self.bed.remove_task(name)
                    del self.runs[name]
                rep.removed.append(name)
        for name, (t, c) in new.items():
            r = old.get(name)
            if r is None:
                self._start(t, c)
                rep.added.append(name)
            elif ((r.choice.version, r.choice.k1, r.choice.k2, r.table.task.source, r.table.task.versions)
                  != (c.version, c.k1, c.k2, t.source, t.versions)):
                self._start(t, c, replace=True)
                rep.redeployed.append(name)
            else:
                r.table = self.tables[name]           # its property (weights, deadline) may have changed
                if (r.choice.edge_share, r.choice.up_share) != (c.edge_share, c.up_share):
                    self.bed.set_shares(name, edge_share=c.edge_share / self.levels if c.edge_share else None,
                                        up_share=c.up_share / self.levels if c.up_share else None)
                    rep.reshared.append(name)
                else:
                    rep.unchanged.append(name)
                r.choice = c
        self.tasks, self.solution = list(tasks), sol
        return rep

    def base_tables(self) -> list[TaskTable]:
        """The running tasks' cost tables for ``self.nominal`` (those of ``self.cluster`` are rescaled from them)."""
        return [self._base[t.name] for t in self.tasks]

    def stats(self, timeout: float = 2.0) -> dict[str, dict[str, dict]]:
        """Every running task's workers' counters: {task: {device: stats}} (a worker that does not answer
        within ``timeout`` is left out; a task being switched may be too)."""
        out = {}
        for name, slot in list(self.bed.slots.items()):
            if name not in self.runs or slot.session is None:
                continue                # the temporary slot of a task being redeployed
            try:
                out[name] = slot.session.stats(timeout=timeout)
            except (EdgepartError, OSError):
                continue
        return out

    # --- requests ----------------------------------------------------------------------------------
    def infer(self, task: str, x: torch.Tensor, timeout: float = 120.0) -> torch.Tensor:
        return self.request(task, x, timeout)[0]

    def request(self, task: str, x: torch.Tensor, timeout: float = 120.0) -> tuple[torch.Tensor, TaskRun]:
        """One request of ``task``: its output and the deployment that answered it (its version's model: the
        reference to check it against). Holds the task's lock: a redeploy switches between two requests."""
        lock = self._locks.get(task)
        if lock is None:
            raise EdgepartError(f"task {task!r} is not running (running: {sorted(self.runs)})")
        if not lock.acquire(timeout=timeout):
            raise EdgepartError(f"task {task!r}: its deployment did not become free within {timeout:g} s")
        try:
            t0 = time.perf_counter()
            y = self.bed.slots[task].session.infer(x, timeout=timeout)
            dt = time.perf_counter() - t0
            with self._req_lock:
                n, s = self._req.get(task, (0, 0.0))
                self._req[task] = (n + 1, s + dt)
            return y, self.runs[task]
        finally:
            lock.release()

    def request_stats(self) -> dict[str, tuple[int, float]]:
        """Per task: requests answered so far and their total wall seconds (what MciaController reads)."""
        with self._req_lock:
            return dict(self._req)

    def test_split(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """The test split (images, labels) of the data set the task's version set was trained on."""
        vs = self._set(task)
        d = vs.info["data"]
        key = (d["dataset"], int(d["input_size"]), int(d["split_seed"]))
        if key not in self._splits:
            test = datasets.load(*key).test
            self._splits[key] = (test.x, test.y)
        return self._splits[key]

    def measure(self, inputs: torch.Tensor | None = None, labels: torch.Tensor | None = None, requests: int = 10,
                warmup: int = 2, timeout: float = 120.0) -> RunReport:
        """Every task sends ``warmup`` + ``requests`` inputs (task i starts at input i × requests), one in
        flight, all tasks at once; the report compares each with its prediction and its version's output.
        ``inputs``/``labels``: None takes each task's own test split (its version set's data set)."""
        results: dict[str, TaskResult] = {}
        errors: dict[str, BaseException] = {}
        start = threading.Barrier(len(self.tasks))

        def one(i: int, task: Task) -> None:
            try:
                run = self.runs[task.name]
                xs, ys = (inputs, labels) if inputs is not None else self.test_split(task)
                idx = [(i * requests + j) % len(xs) for j in range(warmup + requests)]
                start.wait(timeout)
                lat, diffs, correct = [], [], 0
                for n, k in enumerate(idx):
                    x = xs[k:k + 1]
                    t0 = time.perf_counter()
                    y, answered = self.request(task.name, x, timeout=timeout)
                    dt = time.perf_counter() - t0
                    with torch.no_grad():
                        ref = answered.model(x)
                    diffs.append(float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
                    if n < warmup:
                        continue
                    lat.append(dt * self.bed.time_scale * 1e3)
                    if ys is not None:
                        correct += int(y.argmax(1).item() == int(ys[k]))
                v = run.table.versions[run.choice.version]
                c = run.choice
                out = self.solution.outcomes[[t.name for t in self.tasks].index(task.name)]
                up, edge = c.k1 < v.last, c.k2 > c.k1
                results[task.name] = TaskResult(
                    task.name, task.source, v.name, "/".join(map(str, run.nodes)),
                    c.edge_share if edge else 0, c.up_share if up else 0, out.latency_s * 1e3,
                    statistics.median(lat), max(diffs), run.accuracy,
                    correct / len(lat) if ys is not None else float("nan"), len(lat), lat)
            except BaseException as e:  # noqa: BLE001 — reported below, naming the task
                errors[task.name] = e
                start.abort()

        threads = [threading.Thread(target=one, args=(i, t), name=f"task-{t.name}") for i, t in enumerate(self.tasks)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            name, e = next(iter(errors.items()))
            if isinstance(e, threading.BrokenBarrierError) and len(errors) > 1:
                name, e = next((n, x) for n, x in errors.items() if not isinstance(x, threading.BrokenBarrierError))
            raise EdgepartError(f"task {name!r} failed on the testbed: {type(e).__name__}: {e}") from e
        return RunReport([results[t.name] for t in self.tasks], self.bed.time_scale, self.levels,
                         self.solution.objective, self.solution.gap)

    def close(self) -> None:
        if self.bed is not None:
            self.bed.close()
            self.bed = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

