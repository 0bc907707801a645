"""Distributed training: explicit reducers (``reducer``), FSDP2 / DTensor parameters (``fsdp``), the
ZeRO-style ``ShardedOptimizer`` (``sharded``, imported on use: it needs torch.distributed initialised) and the
optimizer state in the form torch.distributed.checkpoint needs (``dcp``, used by ``LearnedOptimizer``'s
``state_dict`` / ``load_state_dict``).

No module-global state: what a step reduces over is the reducer objects ``LearnedOptimizer.step`` passes to
the family (one per tensor, one across tensors), visible at every call site.
"""

from __future__ import annotations

from .fsdp import gather_param, global_mean, is_dtensor, local_slices, scatter_back, shard_spec
from .reducer import (
    ALL_TENSORS,
    WHOLE,
    GroupTensors,
    ShardReducer,
    ShardSpec,
    TensorReducer,
    TensorsReducer,
)

__all__ = [
    "ALL_TENSORS",
    "WHOLE",
    "GroupTensors",
    "ShardReducer",
    "ShardSpec",
    "TensorReducer",
    "TensorsReducer",
    "gather_param",
    "global_mean",
    "is_dtensor",
    "local_slices",
    "scatter_back",
    "shard_spec",
]
