"""What every pass agrees on about an fx graph."""
from __future__ import annotations

# Nodes that compute something (and get node.meta["op"], row maps, FLOPs); the others
# are placeholders, get_attr (parameters and buffers) and the output.
COMPUTE_OPS = ("call_module", "call_function", "call_method")
