"""A stand-in for another library's ops package (torchvision.ops is not installed here).

Laid out like torchvision.ops: the package re-exports the function ``stochastic_depth`` from its
submodule ``stochastic_depth``, so the attribute ``tests.corpus.ops.stochastic_depth`` is the
function, not the module — a call target named by its dotted ``__module__`` path does not resolve
by attribute access (issue #21).
"""
from tests.corpus.ops.stochastic_depth import StochasticDepth, stochastic_depth

__all__ = ["StochasticDepth", "stochastic_depth"]
