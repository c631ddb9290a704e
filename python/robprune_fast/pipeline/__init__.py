"""The robust pruning pipeline (Sehwag et al. 2019; HYDRA 2020): pretrain a robust network,
prune it (objective-agnostic magnitude or random pruning, or HYDRA's objective-aware scores),
fine-tune it with the same objective, and report benign, empirical-robust and verified-robust
accuracy of the dense and the pruned networks side by side.

``config`` validates a run's YAML configuration, ``run`` holds the resumable stages, ``report``
writes the table and the plot; the ``robprune`` command (``cli``) drives them.
"""
from .config import RunConfig, load
from .run import Run

__all__ = ["RunConfig", "Run", "load"]
