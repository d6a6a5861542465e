"""Errors edgepart raises. Each names what is wrong (node, device, file) and what to do.

Workers report failures as error frames with an :class:`ErrorCode`; :func:`error_for` is the one
table from a code to the exception a client raises.
"""
from __future__ import annotations

from enum import Enum


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


class WorkerDied(EdgepartError):
    """A worker died, stopped answering or is unreachable; ``device`` names it."""

    def __init__(self, device: str, message: str):
        super().__init__(message)
        self.device = device


class RemoteError(EdgepartError):
    """A request failed on a worker (the message says which device and why)."""


class ErrorCode(str, Enum):
    """Why something failed on a worker: the ``code`` of every error frame (``error``, ``fail``,
    ``deploy_error``, ``profile_error``, ``probe_error``; docs/wire-format.md). A frame's ``device``
    is the device the failure is about — for ``peer_down`` the device that is down, else the one
    it happened on."""

    PEER_DOWN = "peer_down"              # a device the request needs closed its connection or is unreachable
    TIMEOUT = "timeout"                  # a request waited longer than the worker's --request-timeout
    STAGE_FAILED = "stage_failed"        # a compute stage raised
    INTERNAL = "internal"                # anything else that went wrong running a request's actions
    REDEPLOYED = "redeployed"            # the device was deployed again while the request was in flight
    CLIENT_GONE = "client_gone"          # the client that sent the request disconnected
    DEPLOY_FAILED = "deploy_failed"      # a deploy was refused (bad manifest, file, peers) or did not load
    BUSY = "busy"                        # the worker already runs the one profile it runs at a time
    PROFILE_FAILED = "profile_failed"    # remote profiling raised
    PROBE_FAILED = "probe_failed"        # a link probe raised


# The exception a client raises for an error frame, by its code (any code not listed: RemoteError).
ERROR_CLASSES: dict[ErrorCode, type[EdgepartError]] = {
    ErrorCode.PEER_DOWN: WorkerDied,
    ErrorCode.DEPLOY_FAILED: BundleError,
    ErrorCode.BUSY: EdgepartError,
    ErrorCode.PROFILE_FAILED: EdgepartError,
    ErrorCode.PROBE_FAILED: EdgepartError,
}


def error_for(code, device: str | None, message: str) -> EdgepartError:
    """The exception for an error frame's ``code``, ``device`` and ``message`` (decided by the code alone:
    the message is for people). An unknown code gives a RemoteError."""
    try:
        cls = ERROR_CLASSES.get(ErrorCode(code), RemoteError)
    except ValueError:
        cls = RemoteError
    if cls is WorkerDied:
        return WorkerDied(str(device), message)
    return cls(message)
