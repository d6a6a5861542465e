"""The one interpreter of a device's action list, shared by the reference executor and the worker.

:func:`advance` runs a request's actions on one device from a program counter until the list ends
or an action must wait (a model input or a piece that has not arrived). What differs between
executors — where inputs and pieces come from, how a stage is timed, where pieces and the output
go — is the :class:`Host` they pass in.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from edgepart.errors import BundleError, EdgepartError
from edgepart.ir.manifest import Action, EmitOutput, Recv, Run, Send, TakeInput


class StageError(EdgepartError):
    """A compute stage raised: the message names the device and the stage."""


class Host(Protocol):
    """What an executor provides to :func:`advance` for one request on one device."""

    def take_input(self, act: TakeInput) -> torch.Tensor | None:
        """The model input ``act.tensor``, or None if it has not arrived yet (the request waits)."""

    def take_piece(self, act: Recv) -> torch.Tensor | None:
        """The piece ``act`` names, removed from the mailbox, or None if it has not arrived yet."""

    def run_stage(self, act: Run, run: Any) -> None:
        """Call ``run()`` (which computes the stage, raising :class:`StageError` if it fails), timing
        it however the executor does. May raise to stop the request (e.g. it was cancelled)."""

    def send_piece(self, act: Send, piece: torch.Tensor) -> None:
        """Hand rows [act.a, act.b) of ``act.tensor`` (contiguous) to device ``act.dst``."""

    def emit_output(self, value: Any) -> None:
        """The model's output for this request (source device only)."""


def advance(program, store, pc: int, host: Host) -> tuple[int, Action | None]:
    """Run ``program.actions[pc:]`` against ``store`` until done or blocked.

    Returns ``(pc, waiting)``: the index of the first action not done, and that action if it waits
    for something (``None`` when the list is finished). A stage that raises is reported as a
    :class:`StageError` naming the device and the stage; what the host raises passes through."""
    actions = program.actions
    tensors = program.manifest.tensors
    while pc < len(actions):
        act = actions[pc]
        if isinstance(act, TakeInput):
            x = host.take_input(act)
            if x is None:
                return pc, act
            store.put(act.tensor, 0, tensors[act.tensor].rows, x)
        elif isinstance(act, Recv):
            piece = host.take_piece(act)
            if piece is None:
                return pc, act
            store.put(act.tensor, act.a, act.b, piece)
        elif isinstance(act, Run):
            host.run_stage(act, lambda stage=act.stage: _run_stage(program, stage, store))
        elif isinstance(act, Send):
            piece = store.get(act.tensor, act.a, act.b)
            piece = piece.contiguous() if isinstance(piece, torch.Tensor) else torch.as_tensor(piece)
            host.send_piece(act, piece)
        elif isinstance(act, EmitOutput):
            host.emit_output(program.make_output(store))
        else:
            raise BundleError(f"device {program.device!r}: unknown action {act!r}")
        pc += 1
    return pc, None


def _run_stage(program, stage: int, store) -> None:
    try:
        program.run_stage(stage, store)
    except EdgepartError:
        raise
    except Exception as e:  # noqa: BLE001 — name the device and stage, not a frame inside torch
        raise StageError(f"device {program.device!r}, stage {stage}: {type(e).__name__}: {e}") from e


class _Mailbox:
    """The reference executor's host: every device in one process, pieces through one dict."""

    def __init__(self, inputs: dict[str, torch.Tensor]):
        self.inputs = inputs
        self.pieces: dict[tuple, torch.Tensor] = {}
        self.result: Any = None
        self.device = ""

    def take_input(self, act: TakeInput) -> torch.Tensor:
        return self.inputs[act.tensor]

    def take_piece(self, act: Recv) -> torch.Tensor | None:
        return self.pieces.pop((act.src, self.device, act.tensor, act.a, act.b), None)

    def run_stage(self, act: Run, run) -> None:
        run()

    def send_piece(self, act: Send, piece: torch.Tensor) -> None:
        # a clone: the sender may free or reuse its rows before the receiver runs
        self.pieces[(self.device, act.dst, act.tensor, act.a, act.b)] = piece.clone()

    def emit_output(self, value: Any) -> None:
        self.result = value


def run_reference(programs: dict, inputs: dict[str, torch.Tensor]):
    """Run every device's program in this process, moving exactly the manifest's pieces: the
    reference a distributed run must equal. Raises BundleError if the action lists deadlock."""
    mailbox = _Mailbox(inputs)
    stores = {d: p.new_store() for d, p in programs.items()}
    pcs = {d: 0 for d in programs}
    while True:
        progressed = False
        for dev, prog in programs.items():
            mailbox.device = dev
            pc, _ = advance(prog, stores[dev], pcs[dev], mailbox)
            progressed |= pc != pcs[dev]
            pcs[dev] = pc
        if all(pcs[d] == len(p.actions) for d, p in programs.items()):
            return mailbox.result
        if not progressed:
            waiting = {d: programs[d].actions[pcs[d]] for d in programs if pcs[d] < len(programs[d].actions)}
            raise BundleError(f"the bundle's actions deadlock; devices waiting: {waiting}")
