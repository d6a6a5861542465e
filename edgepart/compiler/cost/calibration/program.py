"""A model's edgepart device program, to be timed whole: run here (:func:`program_forward`) or in a
local worker process (:class:`ProgramTimer`)."""
from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

from edgepart.cluster import Cluster
from edgepart.compiler.bundle import compile as compile_model
from edgepart.testbed.local import LocalCluster


def _one_device_bundle(model, example_inputs: tuple, backend: str = "torch"):
    """``model`` compiled for a cluster of one device named ``device`` running on ``backend`` (its whole
    device program)."""
    one = Cluster.from_dict({"source": "device", "devices": [{"name": "device", "speed": 1.0, "backend": backend}],
                             "links": {}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # no profile: the plan is one device whatever the costs say
        return compile_model(model, example_inputs, one, strategy="single")


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def program_forward(model, example_inputs) -> Callable[[], object]:
    """A callable that runs ``model``'s edgepart device program on ``example_inputs`` in this process:
    the model compiled for one device (strategy ``single``) and run by the reference executor, as a
    worker runs it. For timing the model as the runtime executes it
    (:func:`~edgepart.compiler.cost.calibration.whole_model.model_speed` with ``program=True``)."""
    inputs = _as_tuple(example_inputs)
    bundle = _one_device_bundle(model, inputs)
    return lambda: bundle.run_local(*inputs)


class ProgramTimer:
    """Times a model's device program as a worker runs it: the model compiled for one device, deployed
    to one local worker process (unemulated, pinned to ``cpuset``) and the worker's thread CPU time in
    its stages (``stage_cpu_us`` of its stats) read per request. For
    :func:`~edgepart.compiler.cost.calibration.whole_model.model_speed`: the devices are such workers,
    and timed in the planning process instead the same program read far less steadily (MobileNetV2 on
    this VM: model speed 0.88–1.33 between rounds of one calibration there, 1.15–1.28 in a worker).

        with ProgramTimer(model, (x,), cpuset=[1]) as timer:
            seconds = timer.time(budget_s=1.0)

    ``backend="onnxruntime"``: the program's stages run as ONNX Runtime sessions (one thread, on the
    worker's compute thread, so its thread CPU time is theirs). ``between``: called before each timed
    request, untimed — what a device does between requests (on the emulated testbed a host-speed probe
    runs torch networks before every request; after it MobileNetV2's program on ONNX Runtime took
    7.2–7.3 ms where back to back it took 5.7–6.2, on torch 19.7 where 18.5–19.0: timed warm, the
    model speed of an ONNX Runtime device came out 1.2× too fast).
    """

    def __init__(self, model, example_inputs, cpuset: list[int] | None = None, backend: str = "torch",
                 between: Callable[[], object] | None = None):
        self.between = between
        self.inputs = _as_tuple(example_inputs)
        self.cluster = LocalCluster(_one_device_bundle(model, self.inputs, backend), cpuset=cpuset)
        try:
            self.cluster.infer(*self.inputs)     # deployed and warm
        except BaseException:
            self.cluster.close()                 # no worker left behind by a failed first request
            raise

    def _stage_cpu_s(self) -> float:
        stats = self.cluster.stats()["device"]
        return sum(v for k, v in stats.items() if k.startswith("stage_cpu_us:")) / 1e6

    def time(self, budget_s: float = 1.0, min_repeats: int = 3, max_repeats: int = 20) -> float:
        """Median thread CPU seconds of the worker's stages per request, over requests sent for about ``budget_s``."""
        t0, per = time.perf_counter(), []
        while len(per) < max_repeats and (len(per) < min_repeats or time.perf_counter() - t0 < budget_s):
            if self.between is not None:
                self.between()
            before = self._stage_cpu_s()
            self.cluster.infer(*self.inputs)
            per.append(self._stage_cpu_s() - before)
        return statistics.median(per)

    def close(self) -> None:
        self.cluster.close()

    def __enter__(self) -> ProgramTimer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
