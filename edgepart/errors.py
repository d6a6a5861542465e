"""Errors edgepart raises. Each names what is wrong (node, device, file) and what to do."""


class EdgepartError(Exception):
    """Base class of every error edgepart raises on purpose."""


class TraceError(EdgepartError):
    """The model could not be traced or its shapes could not be propagated."""


class UnsupportedOpError(EdgepartError):
    """A node cannot be compiled at all (not even as a whole-tensor fallback)."""


class PlanError(EdgepartError):
    """A plan is illegal for this graph and cluster, or no legal plan exists."""


class BundleError(EdgepartError):
    """A bundle on disk is incomplete, tampered with, or of an unknown schema."""


class ClusterError(EdgepartError):
    """A cluster description is malformed."""


class InputShapeError(EdgepartError, ValueError):
    """An input does not have the shape or dtype the bundle was compiled for."""
