"""From a model to the engine's ops, accepting only modules whose forward the engine knows.

The engine bounds what it reads off the modules, so it must read exactly what ``model(x)``
computes. A subclass with its own ``forward`` (HYDRA's score layers are one), a forward hook or
pre-hook, an instance whose ``forward`` was replaced, or a global hook could compute something
else, and bounding the stock layer instead would certify points the model misclassifies. So a
module is accepted only when its class runs the stock methods of a layer the engine knows and
no hook can change its output; anything else raises ``TypeError`` naming the module and why.

Masks: ``nn.MaskedLinear`` / ``nn.MaskedConv2d`` apply their ``weight_mask``, and the engine reads
it. torch.nn.utils.prune's forward pre-hook computes ``weight = weight_orig * weight_mask``
(likewise for a pruned bias); it is the one hook accepted, and the engine reads the product
from the same two tensors. A ``weight_mask`` buffer without that hook is ignored, as the
module's forward ignores it. New-style parametrizations (torch.nn.utils.parametrize) keep the
stock forward and compute ``weight`` on access, so they are read like any weight.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as module_globals
from torch.nn.utils import prune

from ..models import Normalize, PreActBlock
from ..nn import CompressedConv2d, CompressedLinear, MaskedConv2d, MaskedLinear
from .affine import Conv, Linear
from .layers import AvgPool, BatchNorm, Flatten, MaxPool, Op, ReLU, Residual, Scale

# Known layers and the methods of theirs that decide what their forward computes. A subclass
# may add anything else (extra_repr, init helpers) but must inherit these.
_STOCK_METHODS = {
    MaskedLinear: ("forward", "effective_mask"),   # before their bases: isinstance picks
    MaskedConv2d: ("forward", "_conv_forward", "effective_mask"),  # the first match
    CompressedLinear: ("forward", "weight", "weight_mask", "kept_index"),
    CompressedConv2d: ("forward", "weight", "weight_mask", "kept_index"),
    nn.Sequential: ("forward", "__iter__"),
    nn.Linear: ("forward",),
    nn.Conv2d: ("forward", "_conv_forward"),
    nn.ReLU: ("forward",),
    nn.BatchNorm1d: ("forward", "_check_input_dim"),
    nn.BatchNorm2d: ("forward", "_check_input_dim"),
    nn.Flatten: ("forward",),
    nn.Identity: ("forward",),
    nn.AvgPool2d: ("forward",),
    nn.AdaptiveAvgPool2d: ("forward",),
    nn.MaxPool2d: ("forward",),
    Normalize: ("forward",),
    PreActBlock: ("forward",),
}
SUPPORTED = ", ".join(c.__name__ for c in _STOCK_METHODS)
_CALL_METHODS = ("__call__", "_call_impl", "_wrapped_call_impl")


def _known_base(module: nn.Module, label: str):
    """The known layer class module is an instance of; TypeError for anything else."""
    for base in _STOCK_METHODS:
        if isinstance(module, base):
            return base
    hint = ""
    if hasattr(module, "_orig_mod"):
        hint = " (a torch.compile wrapper: pass the original module, model._orig_mod)"
    elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        hint = " (a parallel wrapper: pass model.module)"
    raise TypeError(f"unsupported layer {label} ({type(module).__name__}){hint}; supported: "
                    f"{SUPPORTED}, with their stock forward")


def _check_stock(module: nn.Module, base, label: str):
    """module runs base's own forward, called the stock way, with no hook but prune's."""
    cls = type(module)
    for attr in _STOCK_METHODS[base] + _CALL_METHODS:
        if attr in vars(module):
            raise TypeError(f"unsupported layer {label}: its {attr} was replaced on the instance; "
                            "the bound engine can only bound the stock layer")
        if getattr(cls, attr, None) is not getattr(base, attr, None):
            raise TypeError(f"unsupported layer {label}: {cls.__name__} overrides "
                            f"{base.__name__}.{attr}, so the engine cannot know what it computes")
    hooks = [h for h in module._forward_pre_hooks.values()
             if not isinstance(h, prune.BasePruningMethod)] + list(module._forward_hooks.values())
    if hooks:
        raise TypeError(f"unsupported layer {label}: it has forward hooks or pre-hooks "
                        f"({', '.join(type(h).__name__ for h in hooks)}), which may change its "
                        "output; for weight normalisation use the parametrized form "
                        "(torch.nn.utils.parametrizations.weight_norm)")
    pruned = [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
    if pruned and (not isinstance(module, (nn.Linear, nn.Conv2d))
                   or isinstance(module, (MaskedLinear, MaskedConv2d))):
        raise TypeError(f"unsupported layer {label}: torch.nn.utils.prune is supported on plain "
                        "Linear and Conv2d layers only (masked layers carry their own mask)")


def _check_global_hooks():
    hooks = (module_globals._global_forward_hooks, module_globals._global_forward_pre_hooks)
    if any(len(h) for h in hooks):
        raise TypeError("global forward hooks are registered (torch.nn.modules.module."
                        "register_module_forward_hook / _pre_hook); they may change every "
                        "layer's output, so the bound engine refuses to bound the model")


def _pruned_tensor(module: nn.Module, name: str):
    """(tensor, mask) the forward uses for parameter ``name``: torch.nn.utils.prune's pair
    (name_orig, name_mask) when a pruning hook computes it, else (module.name, None)."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            return getattr(module, f"{name}_orig"), getattr(module, f"{name}_mask")
    return getattr(module, name), None


def _affine(module, label, dtype):
    """Linear / Conv op with the weight, bias and mask module's forward applies (and, for a
    masked module, its path: dense or compressed)."""
    path = kept = shape = None
    if isinstance(module, (MaskedLinear, MaskedConv2d)):
        weight, mask, path = module.weight, module.effective_mask(), module.path
    elif isinstance(module, (CompressedLinear, CompressedConv2d)):
        # The compressed path, as the module's own forward takes; the dense views when asked.
        weight, mask, shape = (lambda: module.weight), (lambda: module.weight_mask), module.weight_shape
        kept, path = (module.weight_values, module.kept_index()), "sparse"
    else:
        weight, mask = _pruned_tensor(module, "weight")
    bias, bias_mask = _pruned_tensor(module, "bias")
    if bias_mask is not None:
        bias = bias * bias_mask
    if isinstance(module, (nn.Linear, CompressedLinear)):
        return Linear(label, weight, bias, mask, dtype, path, kept, shape)
    return Conv(label, weight, bias, mask, dtype, module, path, kept, shape)


def compile_model(model: nn.Module, dtype) -> list[Op]:
    """The flat list of ops that ``model`` runs, nested Sequentials unrolled."""
    _check_global_hooks()
    return _compile(model, "", dtype)


def _compile(module: nn.Module, name: str, dtype) -> list[Op]:
    label = name or type(module).__name__
    base = _known_base(module, label)
    _check_stock(module, base, label)
    if base is nn.Sequential:
        # _modules, not named_children(): a module instance used twice runs twice.
        return [op for child_name, child in module._modules.items()
                for op in _compile(child, f"{name}.{child_name}" if name else child_name, dtype)]
    if base in (nn.Linear, nn.Conv2d, MaskedLinear, MaskedConv2d, CompressedLinear, CompressedConv2d):
        return [_affine(module, label, dtype)]
    if base is nn.ReLU:
        return [ReLU(label)]
    if base in (nn.BatchNorm1d, nn.BatchNorm2d):
        return [BatchNorm(label, module, dtype)]
    if base is Normalize:
        std = module.std.to(dtype)
        return [Scale(label, 1 / std, -module.mean.to(dtype) / std)]
    if base is nn.Flatten:
        if module.start_dim != 1 or module.end_dim != -1:
            raise TypeError(f"unsupported layer {label} (Flatten must keep the batch dim and "
                            f"flatten the rest, got start_dim={module.start_dim}, "
                            f"end_dim={module.end_dim})")
        return [Flatten(label)]
    if base in (nn.AvgPool2d, nn.AdaptiveAvgPool2d):
        return [AvgPool(label, module)]
    if base is nn.MaxPool2d:
        return [MaxPool(label, module)]
    if base is nn.Identity:
        return []
    return [_residual(module, label, dtype)]


def _residual(block: PreActBlock, name: str, dtype) -> Residual:
    part = lambda child: _compile(getattr(block, child), f"{name}.{child}", dtype)
    relu = lambda what: [_relu_named(block.relu, f"{name}.relu({what})")]
    pre = part("bn1") + relu("bn1")
    main = part("conv1") + part("bn2") + relu("bn2") + part("conv2")
    shortcut = None if block.shortcut is None else part("shortcut")
    return Residual(name, pre, main, shortcut)


def _relu_named(module, label):
    if not isinstance(module, nn.ReLU):
        raise TypeError(f"unsupported layer {label} ({type(module).__name__}): PreActBlock's "
                        "relu must be an nn.ReLU")
    _check_stock(module, nn.ReLU, label)
    return ReLU(label)
