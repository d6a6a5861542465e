"""The one table of tensor dtypes a bundle, a manifest and the wire may name."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The table's name of ``dtype``; a dtype outside the table keeps torch's own name (``complex64``),
    which a manifest records but no tensor of it can cross the wire."""
    return DTYPE_NAMES.get(dtype) or str(dtype).removeprefix("torch.")
