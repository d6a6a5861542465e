"""A version set as a table: rich for the terminal (``edgepart versions show DIR``), Markdown for results."""
from __future__ import annotations

from rich import box
from rich.table import Table

from edgepart.versions.store import VersionRecord, VersionSet

COLUMNS = ["version", "scale", "test acc", "MMACs", "params", "KiB", "predicted ms", "measured ms", "eager ms",
           "runs"]
_SHORT = {"test acc": "acc", "predicted ms": "pred ms", "measured ms": "meas ms", "eager ms": "eager"}


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def row(r: VersionRecord) -> list[str]:
    return [r.name, f"{r.scale:.2f}" + (" int8" if r.quantized else ""), f"{100 * r.accuracy:.1f} %",
            f"{r.macs / 1e6:.2f}", f"{r.params:,}", f"{r.bytes / 1024:.0f}", _ms(r.predicted_ms),
            _ms(r.measured_ms), _ms(r.eager_ms), "partitioned" if r.partitionable else "in-process"]


def rich_table(vs: VersionSet) -> Table:
    data = vs.info["data"]
    t = Table(box=box.SIMPLE_HEAD, title=f"{vs.model_name}: {len(vs.records)} versions, {data['dataset']} "
                    f"({data['split_sizes']['test']} test images, {data['input_size']}×{data['input_size']})")
    for c in COLUMNS:
        t.add_column(_SHORT.get(c, c), justify="left" if c in ("version", "runs") else "right",
                     no_wrap=c == "version", min_width=10 if c == "version" else None)
    for r in vs.records.values():
        t.add_row(*row(r))
    return t


def markdown(vs: VersionSet, model_column: bool = False) -> list[str]:
    """Table rows in Markdown (header included unless ``model_column``, where the caller writes it)."""
    lines = [] if model_column else ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in vs.records.values():
        cells = row(r)
        lines.append("| " + " | ".join(([vs.model_name] if model_column else []) + cells) + " |")
    return lines
