// Argument checks and layout helpers shared by the ops of linear and conv2d layers (the
// interval ops and CROWN's backward steps through them): the layer's weight, bias, mask and
// cached weight pair, and a convolution's geometry. Messages name the argument and what was
// expected.
#pragma once

#include <robprune/checks.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace robprune {

// weight (weight_dim-D), bias (out,), mask (like weight) and weight_pair (2, *weight.shape),
// all with the dtype and device of `ref` (named ref_name).
inline void check_layer_weights(const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& mask,
                                const c10::optional<at::Tensor>& weight_pair, int64_t weight_dim,
                                const at::Tensor& ref, const char* ref_name) {
  check_like(weight, "weight", ref, ref_name);
  check_dim(weight, "weight", weight_dim, weight_dim == 2 ? "(out_features, in_features)"
                                                          : "(out_channels, in_channels/groups, kH, kW)");
  // A linear layer without inputs (its output is its bias) or outputs is well defined and runs;
  // ATen's convolutions have no such case (with no input channels, conv2d returns its input).
  TORCH_CHECK(weight_dim == 2 || weight.numel() > 0, "weight must have every dimension (out_channels, ",
              "in_channels/groups, kH, kW) >= 1: a convolution over an empty weight is not supported, "
              "got shape ", weight.sizes());
  if (bias) {
    check_like(*bias, "bias", ref, ref_name);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "bias must have shape (", weight.size(0), ",), got ", bias->sizes());
  }
  if (mask) {
    check_like(*mask, "mask", ref, ref_name);
    check_same_shape(*mask, "mask", weight, "weight");
  }
  if (weight_pair) {
    check_like(*weight_pair, "weight_pair", ref, ref_name);
    TORCH_CHECK(weight_pair->dim() == weight.dim() + 1 && weight_pair->size(0) == 2 &&
                    weight_pair->sizes().slice(1) == weight.sizes(),
                "weight_pair must have shape (2, *weight.shape) = (2, ", weight.sizes(), "), got ",
                weight_pair->sizes());
  }
}

// Output length of a convolution along one spatial dimension.
inline int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding,
                                int64_t dilation) {
  return (in + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// A conv2d layer's geometry against its input: `channels` input channels of spatial size
// `size` (H, W), the input being named `input_name` in messages, and a weight of shape
// weight_sizes (out_channels, in_channels / groups, kH, kW), named "weight" in messages.
inline void check_conv_geometry(int64_t channels, at::IntArrayRef size, const char* input_name,
                                at::IntArrayRef weight_sizes, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0,
              "stride must be two positive ints, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "padding must be two non-negative ints, got ", padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] > 0 && dilation[1] > 0,
              "dilation must be two positive ints, got ", dilation);
  TORCH_CHECK(groups > 0, "groups must be positive, got ", groups);
  TORCH_CHECK(weight_sizes[0] % groups == 0, "weight.size(0) (out_channels = ", weight_sizes[0],
              ") must be divisible by groups = ", groups);
  TORCH_CHECK(channels == weight_sizes[1] * groups, input_name, " has ", channels,
              " channels but weight expects in_channels = weight.size(1) * groups = ",
              weight_sizes[1] * groups);
  TORCH_CHECK(size.size() == 2 && size[0] > 0 && size[1] > 0, input_name,
              "'s spatial size must be positive, got ", size);
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = dilation[d] * (weight_sizes[2 + d] - 1) + 1;
    TORCH_CHECK(size[d] + 2 * padding[d] >= extent, input_name, "'s spatial size ", size,
                " plus padding ", padding, " is smaller than the dilated kernel (", extent, ")");
  }
}

inline void check_conv_geometry(int64_t channels, at::IntArrayRef size, const char* input_name,
                                const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_conv_geometry(channels, size, input_name, weight.sizes(), stride, padding, dilation, groups);
}

// Weight-shaped tensors are laid out in the weight's own memory format: channels_last weights
// keep oneDNN's channels_last convolutions free of reorders, and the flat kernels need every
// weight-shaped operand laid out alike.
inline at::Tensor weight_like(const at::Tensor& t, const at::Tensor& weight) {
  return t.contiguous(weight.suggest_memory_format());
}

inline c10::optional<at::Tensor> weight_like(const c10::optional<at::Tensor>& t,
                                             const at::Tensor& weight) {
  return t ? c10::optional<at::Tensor>(weight_like(*t, weight)) : c10::nullopt;
}

// weight * mask: the cached pair's first half when given (checked by the caller), else made here.
inline at::Tensor effective_weight(const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                                   const c10::optional<at::Tensor>& weight_pair) {
  if (weight_pair) return weight_pair->select(0, 0);
  return mask ? at::mul(weight, *mask) : weight;
}

// The four gradients of a layer op with respect to (input, weight, bias, mask).
using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Ops return an empty tensor for each gradient their output_mask did not ask for.
inline at::Tensor empty_if_unused(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

}  // namespace robprune
