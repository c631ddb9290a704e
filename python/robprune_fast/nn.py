"""Drop-in masked layers, and the conversions between them and plain torch modules.

``MaskedLinear`` and ``MaskedConv2d`` are ``nn.Linear`` / ``nn.Conv2d`` with a binary
``weight_mask`` buffer: they compute ``x -> layer(x) with weight * weight_mask`` through the
masked operators of ``robprune_fast.ops`` (a dense path with the mask fused in, or a compressed
path that skips pruned weights, chosen by the mask's density). Their parameters keep the names
``weight`` and ``bias``, so a plain model's state dict loads into a converted one (the mask then
starts full), and the gradient of ``weight`` is masked: a pruned weight never trains.

  convert(model)           every nn.Linear / nn.Conv2d -> its masked twin, in place; layers
                           pruned with torch.nn.utils.prune keep their masks
  to_torch_prune(model)    the way back: plain layers with torch.nn.utils.prune's masks
  strip(model)             plain layers with the zeros baked in: deploys and exports like any
                           other model (torch.export included)
  compress(model)          masked layers -> ``CompressedLinear`` / ``CompressedConv2d``, whose
                           parameters are the kept weights only (fine-tuning with the mask
                           fixed: smaller optimiser state, no dense weight gradient)
  decompress(model)        the way back to masked layers

Structured (channel) pruning makes networks physically smaller; that lives with the pruning
strategies (``pruning``), which know which channels went.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import prune

from . import ops, reference

PATHS = ("auto", "dense", "sparse")


def check_mask(mask: torch.Tensor, weight: torch.Tensor, name: str = "weight_mask") -> torch.Tensor:
    """mask as a tensor like weight (dtype, device, shape) holding only 0 and 1; refuses
    anything else with an error naming it."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != weight.shape:
        raise ValueError(f"{name} must have the weight's shape {tuple(weight.shape)}, got "
                         f"{tuple(mask.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{name} must be on the weight's device ({weight.device}), got "
                         f"{mask.device}")
    if mask.is_complex():
        raise TypeError(f"{name} must be a bool, integer or floating-point tensor, got {mask.dtype}")
    mask = mask.to(weight.dtype)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (a binary mask), got other values")
    return mask


def top_k_straight_through(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The binary mask keeping the ``keep`` largest |scores| (ties broken by position, so
    exactly ``keep`` ones), whose gradient passes straight through to the scores: what HYDRA
    trains its importance scores with."""
    flat = scores.detach().abs().flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    hard = torch.zeros_like(flat).index_fill_(0, order, 1.0).view_as(scores)
    # (scores - scores.detach()) is exactly 0, so the values are exactly the hard mask.
    return hard + (scores - scores.detach())


class _Masked:
    """What MaskedLinear and MaskedConv2d share: the mask buffer, its checks, the path, and
    optional importance scores (HYDRA) that decide the mask while they train."""

    weight: nn.Parameter
    weight_mask: torch.Tensor

    def _init_mask(self, path: str):
        self.register_buffer("weight_mask", torch.ones_like(self.weight, requires_grad=False))
        self.path = path
        self.scores: nn.Parameter | None = None
        self.scores_keep = 0

    def attach_scores(self, scores: torch.Tensor, keep: int) -> None:
        """Let trainable scores decide the mask: the top ``keep`` |scores| (straight-through).
        ``weight_mask`` is left as it is until ``detach_scores`` writes the scores' mask."""
        if scores.shape != self.weight.shape:
            raise ValueError(f"scores must have the weight's shape {tuple(self.weight.shape)}, "
                             f"got {tuple(scores.shape)}")
        if not 0 <= keep <= self.weight.numel():
            raise ValueError(f"keep must lie in [0, {self.weight.numel()}], got {keep}")
        self.scores = nn.Parameter(scores.detach().to(self.weight).clone())
        self.scores_keep = int(keep)

    @torch.no_grad()
    def detach_scores(self) -> None:
        """Write the scores' mask into weight_mask and drop the scores."""
        if self.scores is not None:
            self.weight_mask.copy_(top_k_straight_through(self.scores, self.scores_keep))
            self.scores, self.scores_keep = None, 0

    def effective_mask(self) -> torch.Tensor:
        """The mask the forward applies: weight_mask, or the scores' top-k while they train."""
        if self.scores is None:
            return self.weight_mask
        return top_k_straight_through(self.scores, self.scores_keep)

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str):
        if value not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {value!r}")
        self._path = value

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (checked: the weight's shape, device, 0/1 values)."""
        self.weight_mask.copy_(check_mask(mask, self.weight))

    @property
    def density(self) -> float:
        """Fraction of the weights the mask keeps."""
        return float(self.weight_mask.sum()) / max(self.weight_mask.numel(), 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A plain layer's state dict (no mask) loads: the mask stays as it is (full when new).
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        key = prefix + "weight_mask"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)
        elif key in state_dict:
            try:
                check_mask(self.weight_mask, self.weight, key)
            except (TypeError, ValueError) as e:
                error_msgs.append(str(e))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density:.4f}, path={self.path!r}"


class MaskedLinear(_Masked, nn.Linear):
    """nn.Linear computing F.linear(x, weight * weight_mask, bias) (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, path: str = "auto"):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_mask(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.masked_linear(x, self.weight, self.bias, self.effective_mask(), path=self.path)


class MaskedConv2d(_Masked, nn.Conv2d):
    """nn.Conv2d computing F.conv2d(x, weight * weight_mask, bias, ...) (zeros padding only)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, device=None, dtype=None,
                 path: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, "zeros", device=device, dtype=dtype)
        if isinstance(self.padding, str):
            raise ValueError("MaskedConv2d takes explicit padding (ints), got "
                             f"padding={self.padding!r}")
        self._init_mask(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.masked_conv2d(x, self.weight, self.bias, self.effective_mask(), self.stride,
                                 self.padding, self.dilation, self.groups, path=self.path)


# --- compressed layers: the kept weights are the parameter -------------------------------------------

class _Compressed(nn.Module):
    """What CompressedLinear and CompressedConv2d share: the kept weights of W2 =
    weight.view(out, -1) as the parameter ``weight_values`` (in the CSR's order: row by row,
    columns increasing), their positions as int32 buffers ``weight_row_ptr`` / ``weight_col``,
    and dense views of the weight and mask for code that reads those (the bound engine,
    ``strip``, ``decompress``). The optimiser then holds and updates the kept weights only, and
    backward makes no dense weight gradient (SparseProp's way of training a pruned layer)."""

    weight_shape: tuple[int, ...]

    def _init_kept(self, shape, values, row_ptr, col, bias):
        self.weight_shape = tuple(int(s) for s in shape)
        _check_kept(values, row_ptr, col, self.weight_shape, "weight")
        self.weight_values = nn.Parameter(values)
        self.register_buffer("weight_row_ptr", row_ptr)
        self.register_buffer("weight_col", col)
        self.bias = None if bias is None else nn.Parameter(bias)
        self._index = (None, None)

    def kept_index(self):
        """The SparseIndex of the buffers, built (and checked) once per version of them."""
        key = tuple(ops.sparse_index._version_key(t) for t in (self.weight_row_ptr, self.weight_col))
        if self._index[0] != key or None in key:
            rows, cols = self.weight_shape[0], math.prod(self.weight_shape[1:])
            self._index = (key, ops.sparse.index_of(self.weight_row_ptr, self.weight_col, (rows, cols)))
        return self._index[1]

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, zeros where pruned; differentiable in weight_values."""
        cols = math.prod(self.weight_shape[1:])
        return reference.csr_dense(self.weight_values, self.weight_row_ptr, self.weight_col,
                                   cols).view(self.weight_shape)

    @property
    def weight_mask(self) -> torch.Tensor:
        """The dense binary mask of the kept weights."""
        ones = torch.ones_like(self.weight_values.detach())
        cols = math.prod(self.weight_shape[1:])
        return reference.csr_dense(ones, self.weight_row_ptr, self.weight_col, cols).view(self.weight_shape)

    @property
    def density(self) -> float:
        return self.weight_values.numel() / max(math.prod(self.weight_shape), 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A state dict keeping another number of weights loads too: the kept weights are
        # resized to it first (parameters keep their identity), then checked.
        keys = [prefix + k for k in ("weight_values", "weight_row_ptr", "weight_col")]
        if all(k in state_dict for k in keys):
            values, row_ptr, col = (state_dict[k] for k in keys)
            try:
                _check_kept(values, row_ptr, col, self.weight_shape, prefix + "weight")
            except (TypeError, ValueError) as e:
                error_msgs.append(str(e))
                return
            if values.shape != self.weight_values.shape:
                self.weight_values.data = self.weight_values.new_empty(values.shape)
                self.weight_col = self.weight_col.new_empty(col.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self._layer_repr()}, density={self.density:.4f}"


def _check_kept(values, row_ptr, col, shape, name: str) -> None:
    """A compressed weight's parts (values, int32 CSR) for a weight of ``shape``: errors name them."""
    if not isinstance(values, torch.Tensor) or values.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}_values must be a float32 or float64 tensor")
    if values.dim() != 1 or not isinstance(col, torch.Tensor) or values.shape != col.shape:
        raise ValueError(f"{name}_values must be 1-D with one value per entry of {name}_col")
    if values.device != col.device or not isinstance(row_ptr, torch.Tensor) or row_ptr.device != col.device:
        raise ValueError(f"{name}_values, {name}_row_ptr and {name}_col must be on one device")
    try:
        ops.sparse.index_of(row_ptr, col, (shape[0], math.prod(shape[1:])))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


class CompressedLinear(_Compressed):
    """A pruned linear layer that keeps and trains only its kept weights (see _Compressed):
    computes F.linear(x, weight, bias) with the compressed kernels (ops.sparse). Made by
    ``compress`` from a MaskedLinear; ``decompress`` goes back."""

    def __init__(self, in_features: int, out_features: int, values: torch.Tensor, row_ptr: torch.Tensor,
                 col: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_kept((out_features, in_features), values, row_ptr, col, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops.checks.check_tensor(x, "x")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x's last dimension must be in_features = {self.in_features}, got shape "
                             f"{tuple(x.shape)}")
        return ops.sparse.linear(x, None, self.bias, None, kept=(self.weight_values, self.kept_index()))

    def _layer_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class CompressedConv2d(_Compressed):
    """A pruned conv2d layer (zeros padding) that keeps and trains only its kept weights (see
    _Compressed), on the compressed kernels. Made by ``compress`` from a MaskedConv2d."""

    padding_mode = "zeros"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
                 groups: int, values: torch.Tensor, row_ptr: torch.Tensor, col: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.stride, self.padding, self.dilation = (tuple(pair) for pair in
                                                    ops.checks.conv_geometry(stride, padding, dilation, groups)[:3])
        self.kernel_size = tuple(kernel_size)
        self._init_kept((out_channels, in_channels // groups, *self.kernel_size), values, row_ptr, col, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops.checks.check_tensor(x, "x")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        values = ops.sparse.kept_values(self.weight_values)
        return ops.sparse.sparse_conv2d(x, values, self.bias, self.kept_index(), list(self.kernel_size),
                                        list(self.stride), list(self.padding), list(self.dilation), self.groups)

    def _layer_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


# --- conversions ----------------------------------------------------------------------------------

def _pruned(module: nn.Module) -> dict[str, torch.Tensor]:
    """{tensor name: mask} of torch.nn.utils.prune's hooks on module."""
    return {hook._tensor_name: getattr(module, f"{hook._tensor_name}_mask")
            for hook in module._forward_pre_hooks.values()
            if isinstance(hook, prune.BasePruningMethod)}


def _check_plain(module: nn.Module, name: str, base) -> None:
    """module runs base's stock forward: converting a subclass with its own forward would
    silently change what it computes."""
    if type(module).forward is not base.forward or "forward" in vars(module):
        raise TypeError(f"cannot convert {name} ({type(module).__name__}): it has its own forward")
    hooks = [h for h in module._forward_pre_hooks.values() if not isinstance(h, prune.BasePruningMethod)]
    if hooks or module._forward_hooks:
        raise TypeError(f"cannot convert {name}: it has forward hooks, which would be lost")


def _masked_twin(module: nn.Module, name: str) -> nn.Module:
    pruned = _pruned(module)
    if "bias" in pruned:
        raise TypeError(f"cannot convert {name}: its bias is pruned (torch.nn.utils.prune); "
                        "masked layers mask weights only")
    weight = module.weight_orig if "weight" in pruned else module.weight
    kwargs = dict(bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
    if isinstance(module, nn.Linear):
        _check_plain(module, name, nn.Linear)
        twin = MaskedLinear(module.in_features, module.out_features, **kwargs)
    else:
        _check_plain(module, name, nn.Conv2d)
        if module.padding_mode != "zeros":
            raise TypeError(f"cannot convert {name}: padding_mode {module.padding_mode!r} "
                            "(masked convolutions pad with zeros)")
        padding = _explicit_padding(module, name)
        twin = MaskedConv2d(module.in_channels, module.out_channels, module.kernel_size,
                            module.stride, padding, module.dilation, module.groups, **kwargs)
    with torch.no_grad():
        twin.weight.copy_(weight)
        if module.bias is not None:
            twin.bias.copy_(module.bias)
        if "weight" in pruned:
            twin.set_mask(pruned["weight"])
    twin.train(module.training)
    return twin


def _explicit_padding(conv: nn.Conv2d, name: str):
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total) or any(s != 1 for s in conv.stride):
            raise TypeError(f"cannot convert {name}: asymmetric 'same' padding")
        return tuple(t // 2 for t in total)
    return conv.padding


def _replace_children(model: nn.Module, make, prefix: str = "") -> int:
    """Replace every child module for which make(child, name) returns a module; returns the
    number replaced. A module shared by several parents is replaced once, everywhere."""
    done: dict[int, nn.Module] = {}

    def visit(parent: nn.Module, path: str) -> None:
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{path}.{child_name}" if path else child_name
            if id(child) in done:
                parent._modules[child_name] = done[id(child)]
                continue
            new = make(child, name)
            if new is not None:
                done[id(child)] = new
                parent._modules[child_name] = new
            else:
                visit(child, name)

    visit(model, prefix)
    return len(done)


def convert(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear and nn.Conv2d of model (at any depth) for MaskedLinear /
    MaskedConv2d, in place; returns model. Weights, biases and their names are kept; a layer
    pruned with torch.nn.utils.prune keeps its mask (and loses the pruning hook). Layers that are
    already masked are left alone. A subclass with its own forward, a layer with hooks, or a
    model that is itself one such layer is refused (TypeError naming it)."""
    def make(module, name):
        if isinstance(module, (MaskedLinear, MaskedConv2d)):
            return module
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            return module  # attention's projection: its parent reads the weight, not forward
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return _masked_twin(module, name)
        return None

    if isinstance(model, (nn.Linear, nn.Conv2d)):
        raise TypeError("convert takes a model holding layers; wrap a single layer in "
                        "nn.Sequential first")
    _replace_children(model, make)
    return model


def _plain_twin(module: nn.Module, bake: bool) -> nn.Module:
    """nn.Linear / nn.Conv2d computing what the masked module computes."""
    kwargs = dict(bias=module.bias is not None, device=module.weight.device,
                  dtype=module.weight.dtype)
    if isinstance(module, (MaskedLinear, CompressedLinear)):
        plain = nn.Linear(module.in_features, module.out_features, **kwargs)
    else:
        plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                          module.stride, module.padding, module.dilation, module.groups, **kwargs)
    with torch.no_grad():
        plain.weight.copy_(module.weight * module.weight_mask if bake else module.weight)
        if module.bias is not None:
            plain.bias.copy_(module.bias)
    plain.train(module.training)
    return plain


def strip(model: nn.Module) -> nn.Module:
    """Every masked or compressed layer of model back to a plain nn.Linear / nn.Conv2d with the
    pruned weights set to zero, in place; returns model. The result computes the same outputs
    with stock modules only, so it saves, loads, scripts and exports (torch.export) like any
    model."""
    _replace_children(model, lambda m, name: _plain_twin(m, True)
                      if isinstance(m, (MaskedLinear, MaskedConv2d, _Compressed)) else None)
    return model


def compress(model: nn.Module) -> nn.Module:
    """Every MaskedLinear / MaskedConv2d of model -> CompressedLinear / CompressedConv2d, in place;
    returns model: the kept weights become the parameters (``weight_values``), so fine-tuning a
    pruned network with its mask fixed (natural, adversarial or certified training) updates and
    stores only those, and backward makes no dense weight gradient. Rebuild the optimiser
    afterwards: the parameters are new. A layer with importance scores attached (the mask still
    trains) or a subclass with its own forward is refused (TypeError naming it)."""
    def make(module, name):
        if not isinstance(module, (MaskedLinear, MaskedConv2d)):
            return None
        base = MaskedLinear if isinstance(module, MaskedLinear) else MaskedConv2d
        if type(module).forward is not base.forward or "forward" in vars(module):
            raise TypeError(f"cannot compress {name} ({type(module).__name__}): it has its own forward")
        if module.scores is not None:
            raise TypeError(f"cannot compress {name}: importance scores are attached (its mask still "
                            "trains); call detach_scores() first")
        if module._forward_pre_hooks or module._forward_hooks:
            raise TypeError(f"cannot compress {name}: it has forward hooks, which would be lost")
        return _compressed_twin(module)

    if isinstance(model, (MaskedLinear, MaskedConv2d)):
        raise TypeError("compress takes a model holding layers; wrap a single layer in nn.Sequential first")
    _replace_children(model, make)
    return model


def _kept_parts(weight: torch.Tensor, mask: torch.Tensor):
    """(values, row_ptr, col) of a dense weight's kept entries (mask's ones; checked binary)."""
    index = ops.sparse.pack_mask(mask)
    return weight.detach().flatten()[index.flat_index].clone(), index.row_ptr.clone(), index.col.clone()


def kept_state(name: str, weight: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state-dict entries of compressed layer ``name`` from a dense weight and its mask (a
    masked layer's), which load into it whatever number of weights it kept before."""
    keys = ("weight_values", "weight_row_ptr", "weight_col")
    return {f"{name}.{key}": t for key, t in zip(keys, _kept_parts(weight, mask))}


def _compressed_twin(module: nn.Module) -> nn.Module:
    bias = None if module.bias is None else module.bias.detach().clone()
    parts = (*_kept_parts(module.weight, module.weight_mask), bias)
    if isinstance(module, MaskedLinear):
        twin = CompressedLinear(module.in_features, module.out_features, *parts)
    else:
        twin = CompressedConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                module.padding, module.dilation, module.groups, *parts)
    twin.train(module.training)
    return twin


def decompress(model: nn.Module) -> nn.Module:
    """The inverse of ``compress``: every compressed layer back to a MaskedLinear / MaskedConv2d
    (dense weight with zeros where pruned, the mask of the kept weights), in place; returns
    model."""
    def make(module, name):
        if not isinstance(module, _Compressed):
            return None
        kwargs = dict(bias=module.bias is not None, device=module.weight_values.device,
                      dtype=module.weight_values.dtype)
        if isinstance(module, CompressedLinear):
            twin = MaskedLinear(module.in_features, module.out_features, **kwargs)
        else:
            twin = MaskedConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                module.padding, module.dilation, module.groups, **kwargs)
        with torch.no_grad():
            twin.weight.copy_(module.weight)
            twin.weight_mask.copy_(module.weight_mask)
            if module.bias is not None:
                twin.bias.copy_(module.bias)
        twin.train(module.training)
        return twin

    _replace_children(model, make)
    return model


def to_torch_prune(model: nn.Module) -> nn.Module:
    """Every masked layer of model back to a plain layer pruned with torch.nn.utils.prune
    (weight_orig + weight_mask), in place; returns model: the inverse of ``convert``."""
    def make(module, name):
        if not isinstance(module, (MaskedLinear, MaskedConv2d)):
            return None
        plain = _plain_twin(module, False)
        prune.custom_from_mask(plain, "weight", module.weight_mask.detach().clone())
        return plain

    _replace_children(model, make)
    return model


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of model's masked layers, in module order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (MaskedLinear, MaskedConv2d))}
