"""One thin Python wrapper per robprune_fast operator.

Every op is ``torch.ops.robprune_fast.<name>``: its schema is in pyext/module.cpp, its kernels
in csrc/<family>/, its wrapper (argument checks), fake kernel and autograd formula side by side
in this package's module of its family, and its pure-PyTorch twin in ``reference.py``:

  box          box_from_bounds, input_box, relu_box_
  weight_pair  masked_weight_pair, weight_cache
  interval     interval_linear, interval_conv2d
  crown        crown_relu_backward, crown_linear_backward, crown_conv2d_backward
  masked       masked_linear, masked_conv2d (the layers of pruned networks)

Where the extension has no kernel for a device an op runs its twin after a one-time warning
(``_dispatch``); ``reference_only()`` runs every op on its twin. ``unchecked`` holds the bound
engine's entries without the Python checks.

Box convention: boxes are (centre, radius) with radius >= 0; see ``reference.py``.
"""
from . import unchecked
from ._dispatch import IMPORT_ERROR, _C, reference_only
from .box import box_from_bounds, input_box, relu_box_
from .crown import crown_conv2d_backward, crown_linear_backward, crown_relu_backward
from .interval import interval_conv2d, interval_linear
from .masked import masked_conv2d, masked_linear
from .weight_pair import masked_weight_pair, weight_cache

__all__ = ["box_from_bounds", "input_box", "relu_box_", "masked_weight_pair", "weight_cache",
           "interval_linear", "interval_conv2d", "crown_relu_backward", "crown_linear_backward",
           "crown_conv2d_backward", "masked_linear", "masked_conv2d", "reference_only",
           "unchecked"]
