"""Tensor parallelism over mx.distributed: sharding (sharding.py), step-plan broadcast (plan.py),
rank start-up (launch.py), rank 0's engine (tp_engine.py) and the follower loop (worker.py).
See docs/tp.md."""

from .launch import RankFailure
from .sharding import ShardError, shard_model
from .tp_engine import TPAsyncEngine, start_tp_engine

__all__ = ["RankFailure", "ShardError", "TPAsyncEngine", "shard_model", "start_tp_engine"]
