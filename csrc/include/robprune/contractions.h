// The linear maps of linear and conv2d layers, forward (an interval layer's centre and radius)
// and adjoint (CROWN's backward steps). Every product goes through ATen (oneDNN / MKL on the
// CPU, cuBLAS / cuDNN on the GPU), the fastest contraction on each platform; the elementwise
// work around them lives in each family's kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace robprune {

using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // input, weight, bias

// x (N, in) -> x w^T + b.
struct LinearContraction {
  at::Tensor forward(const at::Tensor& x, const at::Tensor& w,
                     const c10::optional<at::Tensor>& b) const {
    return b ? at::addmm(*b, x, w.t()) : at::mm(x, w.t());
  }
  Grads3 backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                  std::array<bool, 3> need) const {
    return {need[0] ? at::mm(g, w) : at::Tensor(), need[1] ? at::mm(g.t(), x) : at::Tensor(),
            need[2] ? g.sum(0) : at::Tensor()};
  }
};

// x (N, out) -> x w: the adjoint of LinearContraction, CROWN's backward step through a linear
// layer (no bias: the step's bias term is a separate reduction).
struct LinearAdjointContraction {
  at::Tensor forward(const at::Tensor& x, const at::Tensor& w,
                     const c10::optional<at::Tensor>& /*b*/) const {
    return at::mm(x, w);
  }
  Grads3 backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                  std::array<bool, 3> need) const {
    return {need[0] ? at::mm(g, w.t()) : at::Tensor(), need[1] ? at::mm(x.t(), g) : at::Tensor(),
            at::Tensor()};
  }
};

// x (N, C, H, W) -> conv2d(x, w, b) with the layer's geometry, or with `transposed` its
// adjoint conv_transpose2d(x, w, b) (CROWN's backward step), whose output_padding restores the
// rows and columns a strided forward convolution drops.
struct Conv2dContraction {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
  bool transposed = false;
  std::array<int64_t, 2> output_padding{0, 0};

  at::Tensor forward(const at::Tensor& x, const at::Tensor& w,
                     const c10::optional<at::Tensor>& b) const {
    return at::convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups);
  }
  Grads3 backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                  std::array<bool, 3> need) const {
    const int64_t out_channels = transposed ? w.size(1) * groups : w.size(0);
    return at::convolution_backward(
        g, x, w, need[2] ? at::OptionalIntArrayRef(at::IntArrayRef(&out_channels, 1)) : c10::nullopt,
        stride, padding, dilation, transposed, output_padding, groups, need);
  }
};

}  // namespace robprune
