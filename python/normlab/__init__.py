"""normlab: Batch Normalization and its relatives, exact to PyTorch and fast on a CPU.

- ``normlab.torch``: drop-in replacements for PyTorch's norm layers (BatchNorm1d/2d,
  GroupNorm, LayerNorm, InstanceNorm1d/2d, SyncBatchNorm on CPU, FrozenBatchNorm2d) and
  normlab's own (BatchRenorm2d, GhostBatchNorm2d, LpBatchNorm2d), ``convert`` for any model
  and ``recalibrate`` (PreciseBN). Needs PyTorch.
- ``normlab.functional``: every norm as a function on numpy float32 arrays, with its backward.
- ``normlab.train`` / ``normlab.study`` / ``normlab.load_state_dict``: the engine, in process.
"""

from . import _native
from ._native import get_num_threads, set_num_threads
from .engine import Run, load_state_dict, study, train

__version__ = _native.__version__

__all__ = [
    "Run",
    "train",
    "study",
    "load_state_dict",
    "set_num_threads",
    "get_num_threads",
    "__version__",
]
