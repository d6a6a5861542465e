"""The bundle's intermediate representation: what the compiler emits and the runtime reads.

A leaf package: it imports nothing from edgepart but :mod:`edgepart.errors`. The compiler builds a
:class:`~edgepart.ir.manifest.Manifest`; the runtime loads one (from disk or from a deploy frame)
and runs its typed actions. Row arithmetic shared by the passes and the runtime lives here too.
"""
