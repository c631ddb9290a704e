"""Sound output bounds of a network over an L-inf ball: IBP, CROWN-IBP and CROWN.

``compute_bounds(model, x, eps, method, C)`` bounds the logits (or ``C @ logits``) for every input in
the L-inf ball of radius ``eps`` around ``x`` intersected with the pixel box [0, 1].  eps is in pixel
space: normalisation is a layer of the model and is bounded like any other layer.

Methods
  ``ibp``        interval bound propagation (Gowal et al. 2018).  Linear and conv layers go through
                 the fused interval operators of ``robprune_fast.ops``; a ReLU is fused into the next
                 linear/conv layer (``relu_in``).
  ``crown-ibp``  IBP for the pre-activation bounds of every ReLU, then one CROWN backward pass from
                 the specification (Zhang et al. 2020).
  ``crown``      CROWN backward passes for every ReLU's pre-activation bounds too (Zhang et al.
                 2018).  ``intersect_ibp=True`` intersects them with IBP's and only bounds the neurons
                 IBP leaves unstable (the others' relaxation is exact either way), which is tighter
                 and much cheaper; the default is plain CROWN.

Layers (walked in order through nested ``nn.Sequential``; see ``compile`` for what is accepted):
Linear and Conv2d (with torch.nn.utils.prune's masks), ReLU, BatchNorm1d/2d, Flatten,
``models.Normalize``, AvgPool2d, AdaptiveAvgPool2d, MaxPool2d (IBP only), Identity, and
``models.PreActBlock`` residual blocks (IBP only).  Any other layer raises ``TypeError`` naming
it.  Batch norm in eval mode is the affine map of its running statistics; in training mode (as
IBP training needs) it is the affine map of the batch statistics of the clean input ``x``'s
activations at that layer (the whole box is normalised exactly like the clean batch); running
statistics are never updated here.

Specification.  With ``C`` of shape (B, S, K) (or (S, K), shared by the batch), the bounds are on the
S rows of ``C @ logits``.  When the last layer is Linear, C is folded into it: IBP then bounds
``(C W) h + C b`` directly, which is tighter than multiplying the logit box by C.

Floating point.  Bounds are computed in float32 (float64 when ``x`` is float64 or ``dtype`` says so)
with autocast off and TF32 off, whatever the caller uses.  ``compute_bounds`` and
``bound_details`` widen every bound by a worst-case bound on its rounding (``rounding``), so
that it holds for the exact network and for the model's own floating-point forward: a
certificate is sound in floating point, not only in exact arithmetic (``sound=False`` gives the
exact-arithmetic bounds). IBP widens each box by its own rounding as it goes
(``rounding.Widening``, a few element-wise passes); CROWN-IBP and CROWN carry a budget through
their IBP stage and both sweeps (``rounding.Budget``).  ``training_bounds`` computes exact-arithmetic bounds: a training
loss, never a certificate.  Non-finite intermediates give NaN or infinite bounds, which never
certify.

Checks.  x, eps and C are checked once on entry.  The boxes the engine builds from them have
radius >= 0 by construction, so the interval operators skip re-checking it (``check_radius=False``).
Weights with NaN or inf give NaN bounds, and a NaN margin bound never certifies a point.

Memory.  CROWN's bound matrices have one row per (input, specification row) and one column per neuron
of the layer reached.  ``max_memory`` (bytes) caps the working set of one backward sweep: inputs and
specification rows are processed in chunks sized to fit.  ``compute_bounds`` records nothing for
autograd unless asked (``differentiable=True``), and then refuses a CROWN call whose saved
tensors would exceed the cap; ``training_bounds`` always records (saved tensors are the
training's own), and the cap there bounds the working set only.

The package, by job: ``floats`` (the floating-point context), ``rounding`` (the widening and
the budget that make bounds sound in floating point), ``layers`` and ``affine`` (the ops the
engine knows) and ``compile`` (from modules to ops, and what is accepted), ``ibp`` and ``crown`` (the
two walks; ``crown_steps`` holds CROWN's backward steps), ``api`` (the entry points and their
shared validation) and ``verify`` (verified accuracy).  It uses the interval operators of
``ops`` and knows nothing of training or pruning.
"""
from .api import (DEFAULT_MAX_MEMORY, METHODS, Bounds, TrainingBounds, bound_details,
                  compute_bounds, margin_spec, training_bounds)
from .floats import exact_float
from .verify import Verification, verified_accuracy

__all__ = ["METHODS", "DEFAULT_MAX_MEMORY", "Bounds", "TrainingBounds",
           "Verification", "compute_bounds", "bound_details", "training_bounds", "margin_spec",
           "verified_accuracy", "exact_float"]
