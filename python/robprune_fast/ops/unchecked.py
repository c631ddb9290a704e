"""The bound engine's entries to the ops: the same kernels as the public wrappers, without the
Python argument checks.

The engine builds its own boxes (radius >= 0 by construction) and casts its own weights, so
re-validating them on every call would only cost time: about 13% of an IBP pass on one image
on the CPU. These entries skip the wrappers' checks and, without grad mode, torch's autograd
layer; with ``check_radius=False`` the kernels also skip their radius pass. Every other C++
check still runs, so a wrong shape or dtype still raises. Anything else should call the
checked wrappers in ``robprune_fast.ops``.
"""
from .box import input_box_unchecked as input_box
from .box import relu_box_unchecked as relu_box_
from .interval import interval_conv2d_unchecked as interval_conv2d
from .interval import interval_linear_unchecked as interval_linear

__all__ = ["input_box", "relu_box_", "interval_linear", "interval_conv2d"]
