// The interval family's operators, as registered in pyext/module.cpp (schemas there), and the
// weight helpers the other layer families share with it.
//
// interval_linear / interval_conv2d: the box (center, radius) of the input, optionally pushed
// through ReLU first (relu_in), through x -> (weight * mask) x + bias. Returns the output box as
// (center, radius), or as (lower, upper) when out_bounds. weight_pair, when given, must be
// masked_weight_pair(weight, mask) (check_weight_pair refuses anything else): the Python ops
// cache it per weight version so |W * M| is made once per weight update; it is a cache, not
// differentiated. check_radius=false skips the check that radius >= 0, for a caller that made
// the radius itself (the bound engine); the ReLU of relu_in then runs without it too.
//
// The *_backward ops return (grad center, grad radius, grad weight, grad bias, grad mask); an
// entry whose output_mask flag is false comes back as an empty tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstddef>
#include <tuple>

namespace robprune {

using Grads5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// masked_weight_pair: the (2, *weight.shape) pair (weight * mask, |weight * mask|), each half
// laid out like weight; weight and |weight| without a mask. Recorded (weight_pair_registry.h),
// so that check_weight_pair knows it without a pass over the weights.
at::Tensor masked_weight_pair(const at::Tensor& weight, const c10::optional<at::Tensor>& mask);

// For every op that takes a weight_pair (its shape already checked): refuses a pair that is not
// masked_weight_pair(weight, mask) of these tensors as they are now, since the op would give
// unsound bounds with it. O(1) for a pair masked_weight_pair made and nothing wrote to since;
// any other pair costs one pass that recomputes it (and is then known).
void check_weight_pair(const at::Tensor& weight_pair, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& mask);

// The checks of a layer op whose input x (named x_name) is one tensor: x a floating tensor, the
// layer's weight (weight_dim-D), bias, mask and weight_pair against it (check_layer_weights), and
// check_weight_pair.
void check_layer_args(const at::Tensor& x, const char* x_name, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                      const c10::optional<at::Tensor>& weight_pair, int64_t weight_dim);

// How many pairs the registry holds (for tests: it must not grow without bound).
std::size_t recorded_weight_pairs();

// For layers that multiply by weight * mask alone (CROWN's affine steps): the gradients with
// respect to weight and mask from grad_effective, the gradient with respect to weight * mask.
// One pass; an output not wanted comes back undefined. Arguments as checked by the layer ops.
std::tuple<at::Tensor, at::Tensor> masked_weight_grad(const at::Tensor& grad_effective,
                                                      const at::Tensor& weight,
                                                      const c10::optional<at::Tensor>& mask,
                                                      bool need_weight, bool need_mask);

// input_box: the box (centre, radius) of the L-inf ball of radius eps around x (N, C, *) clipped
// to [0, 1], mapped through the per-channel affine h = x * scale + shift (scale, shift: (C,);
// identity when absent): a model's input normalisation folded into one pass over x. eps has
// one element or the shape of x. Refuses x outside [0, 1] and eps < 0.
std::tuple<at::Tensor, at::Tensor> input_box(const at::Tensor& x, const at::Tensor& eps,
                                             const c10::optional<at::Tensor>& scale,
                                             const c10::optional<at::Tensor>& shift);

// relu_box_: the box (center, radius) mapped through ReLU, written over its own storage: the
// relu_in prologue for a box nobody else reads, without its two fresh copies. center and radius
// must be dense and laid out alike. With check_radius, a negative or NaN radius is refused
// before anything is written (a pass of its own); without, the caller vouches for it. Not
// differentiable (ops refuses inputs that require grad).
void relu_box_(const at::Tensor& center, const at::Tensor& radius, bool check_radius);

std::tuple<at::Tensor, at::Tensor> interval_linear(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight_pair, bool relu_in, bool out_bounds, bool check_radius);

Grads5 interval_linear_backward(const at::Tensor& grad_a, const at::Tensor& grad_b,
                                const at::Tensor& center, const at::Tensor& radius,
                                const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                                const c10::optional<at::Tensor>& weight_pair, bool relu_in,
                                bool out_bounds, std::array<bool, 5> output_mask);

std::tuple<at::Tensor, at::Tensor> interval_conv2d(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight_pair, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu_in, bool out_bounds, bool check_radius);

Grads5 interval_conv2d_backward(const at::Tensor& grad_a, const at::Tensor& grad_b,
                                const at::Tensor& center, const at::Tensor& radius,
                                const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                                const c10::optional<at::Tensor>& weight_pair,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, bool relu_in,
                                bool out_bounds, std::array<bool, 5> output_mask);

}  // namespace robprune
