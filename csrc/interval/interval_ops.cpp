// The interval family's ops: argument checks, then one algorithm for both devices, run with
// the kernels of the input's device (interval_kernels.h); interval_linear and interval_conv2d
// share one algorithm, templated on the layer's contraction (contractions.h).
#include "interval_ops.h"

#include "interval_kernels.h"
#include "weight_pair_registry.h"

#include <robprune/backend.h>
#include <robprune/checks.h>
#include <robprune/contractions.h>
#include <robprune/layer_args.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isnan.h>
#include <c10/util/accumulate.h>

#include <vector>

namespace robprune {
namespace {

// Every pair masked_weight_pair made. Never destroyed: ops may still run while static
// destructors do at exit.
WeightPairRegistry& pair_registry() {
  static auto* registry = new WeightPairRegistry();
  return *registry;
}

// masked_weight_pair's kernel, for arguments already checked; the pair is not recorded.
at::Tensor make_weight_pair(const at::Tensor& weight, const c10::optional<at::Tensor>& mask) {
  return with_backend(weight, [&](auto tag) {
    using K = IntervalKernels<typename decltype(tag)::type>;
    return K::weight_pair(weight_like(weight, weight), weight_like(mask, weight));
  });
}

// Whether a and b (same shape) hold the same values, NaN matching NaN.
bool same_values(const at::Tensor& a, const at::Tensor& b) {
  return at::eq(a, b).logical_or_(at::isnan(a).logical_and_(at::isnan(b))).all().item<bool>();
}

// Shared checks of an interval layer's arguments; weight_dim is 2 (linear) or 4 (conv2d).
void check_interval_args(const at::Tensor& center, const at::Tensor& radius,
                         const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& weight_pair, int64_t weight_dim) {
  check_float(center, "center");
  check_like(radius, "radius", center, "center");
  check_same_shape(radius, "radius", center, "center");
  check_layer_weights(weight, bias, mask, weight_pair, weight_dim, center, "center");
  if (weight_pair) check_weight_pair(*weight_pair, weight, mask);
}

// The number of rows a linear layer's input (*, in_features) holds: the product of its leading
// dimensions (never numel / in_features, which has no answer for in_features = 0).
int64_t linear_rows(const at::Tensor& center) {
  return c10::multiply_integers(center.sizes().slice(0, center.dim() - 1));
}

void check_conv_input(const at::Tensor& center, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_dim(center, "center", 4, "(N, C, H, W)");
  check_conv_geometry(center.size(1), center.sizes().slice(2), "center", weight, stride, padding,
                      dilation, groups);
}

// Whether an interval layer's backward must produce a weight or mask gradient.
bool need_w_any(std::array<bool, 5> need, const c10::optional<at::Tensor>& mask) {
  return need[2] || (need[4] && mask);
}

// The layer algorithm: prologue (radius check unless the caller vouches for the radius,
// optional ReLU) -> two products -> optional conversion to bounds. `center` and `radius` must
// already be laid out alike.
template <class Contraction>
std::tuple<at::Tensor, at::Tensor> affine_forward(
    const Contraction& k, const at::Tensor& center, const at::Tensor& radius,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& weight_pair,
    bool relu_in, bool out_bounds, bool check_radius) {
  return with_backend(center, [&](auto tag) {
    using K = IntervalKernels<typename decltype(tag)::type>;
    auto [c, r] = K::prologue(center, radius, relu_in, /*in_place=*/false, check_radius);
    const at::Tensor pair = weight_pair ? *weight_pair : make_weight_pair(weight, mask);
    at::Tensor a = k.forward(c, pair[0], bias);
    at::Tensor b = k.forward(r, pair[1], c10::nullopt);
    if (out_bounds) {
      b = b.contiguous(a.suggest_memory_format());
      K::to_bounds_(a, b);
    }
    return std::make_tuple(a, b);
  });
}

template <class Contraction>
Grads5 affine_backward(const Contraction& k, const at::Tensor& grad_a, const at::Tensor& grad_b,
                       const at::Tensor& center, const at::Tensor& radius,
                       const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                       const c10::optional<at::Tensor>& weight_pair, bool relu_in,
                       bool out_bounds, std::array<bool, 5> need) {
  return with_backend(center, [&](auto tag) {
    using K = IntervalKernels<typename decltype(tag)::type>;
    // The layer's output has its input's memory format (ATen's convolutions keep it), and
    // handing oneDNN gradients in that same format spares it a reorder per product.
    const auto out_format = center.suggest_memory_format();
    at::Tensor g_out_c = grad_a.contiguous(out_format), g_out_r = grad_b.contiguous(out_format);
    if (out_bounds) std::tie(g_out_c, g_out_r) = K::to_bounds_backward(g_out_c, g_out_r);

    // The products' backward reads the ReLU'd box only for the weight gradient (the input
    // gradient needs its shape alone), and the forward already validated the radius.
    auto [c, r] = relu_in && need_w_any(need, mask)
                      ? K::prologue(center, radius, /*relu=*/true, /*in_place=*/false, /*check=*/false)
                      : std::make_tuple(center, radius);
    const at::Tensor w = weight_like(weight, weight);
    const c10::optional<at::Tensor> m = weight_like(mask, weight);
    const at::Tensor pair = weight_pair ? *weight_pair : make_weight_pair(weight, mask);
    const bool need_in = need[0] || need[1], need_w = need_w_any(need, m);
    auto [g_c, g_wc, g_bias] = k.backward(g_out_c, c, pair[0], {need_in, need_w, need[3]});
    auto [g_r, g_wr, unused] = k.backward(g_out_r, r, pair[1], {need_in, need_w, false});

    const auto in_format = center.suggest_memory_format();
    if (need_in) {
      g_c = g_c.contiguous(in_format);
      g_r = g_r.contiguous(in_format);
      if (relu_in) std::tie(g_c, g_r) = K::prologue_backward(g_c, g_r, center, radius);
    }
    at::Tensor g_w, g_m;
    if (need_w) std::tie(g_w, g_m) = K::weight_grad(weight_like(g_wc, w), weight_like(g_wr, w), w, m,
                                                     need[2], need[4]);
    return Grads5{empty_if_unused(need[0] ? g_c : at::Tensor(), center),
                  empty_if_unused(need[1] ? g_r : at::Tensor(), center), empty_if_unused(g_w, center),
                  empty_if_unused(g_bias, center), empty_if_unused(g_m, center)};
  });
}

// Lays radius out like center (dense, in center's memory format) so flat indices match.
std::tuple<at::Tensor, at::Tensor> dense_alike(const at::Tensor& center, const at::Tensor& radius) {
  const auto format = center.suggest_memory_format();
  return {center.contiguous(format), radius.contiguous(format)};
}

}  // namespace

at::Tensor masked_weight_pair(const at::Tensor& weight, const c10::optional<at::Tensor>& mask) {
  check_float(weight, "weight");
  if (mask) {
    check_like(*mask, "mask", weight, "weight");
    check_same_shape(*mask, "mask", weight, "weight");
  }
  at::Tensor pair = make_weight_pair(weight, mask);
  pair_registry().record(pair, weight, mask);
  return pair;
}

void check_weight_pair(const at::Tensor& weight_pair, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& mask) {
  if (pair_registry().holds(weight_pair, weight, mask)) return;
  // A pair masked_weight_pair did not make, or one that it made from other tensors or before
  // a write to any of the three: one pass to check it, then it is known.
  TORCH_CHECK(same_values(weight_pair, make_weight_pair(weight, mask)),
              "weight_pair must be masked_weight_pair(weight, mask) of the weight and mask given, "
              "as they are now; got another tensor (another weight's or mask's pair, a changed "
              "pair, or one made before weight or mask was written). Pass None to have it made");
  pair_registry().record(weight_pair, weight, mask);
}

void check_layer_args(const at::Tensor& x, const char* x_name, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                      const c10::optional<at::Tensor>& weight_pair, int64_t weight_dim) {
  check_float(x, x_name);
  check_layer_weights(weight, bias, mask, weight_pair, weight_dim, x, x_name);
  if (weight_pair) check_weight_pair(*weight_pair, weight, mask);
}

std::size_t recorded_weight_pairs() { return pair_registry().size(); }

std::tuple<at::Tensor, at::Tensor> masked_weight_grad(const at::Tensor& grad_effective,
                                                      const at::Tensor& weight,
                                                      const c10::optional<at::Tensor>& mask,
                                                      bool need_weight, bool need_mask) {
  return with_backend(weight, [&](auto tag) {
    using K = IntervalKernels<typename decltype(tag)::type>;
    const at::Tensor w = weight_like(weight, weight);
    return K::weight_grad(weight_like(grad_effective, w), at::Tensor(), w, weight_like(mask, w),
                          need_weight, need_mask);
  });
}

void relu_box_(const at::Tensor& center, const at::Tensor& radius, bool check_radius) {
  check_float(center, "center");
  check_like(radius, "radius", center, "center");
  check_same_shape(radius, "radius", center, "center");
  // The kernel walks both buffers by one flat index, writing where it reads.
  TORCH_CHECK(center.is_non_overlapping_and_dense() && radius.strides() == center.strides(),
              "center and radius must be dense and laid out alike (same strides), got strides ",
              center.strides(), " and ", radius.strides());
  at::assert_no_overlap(center, radius);  // each is written from both
  with_backend(center, [&](auto tag) {
    using K = IntervalKernels<typename decltype(tag)::type>;
    // In place, a refusal must come before the first write: the check is a pass of its own.
    if (check_radius) K::prologue(center, radius, /*relu=*/false, /*in_place=*/true, /*check=*/true);
    K::prologue(center, radius, /*relu=*/true, /*in_place=*/true, /*check=*/false);
  });
}

std::tuple<at::Tensor, at::Tensor> input_box(const at::Tensor& x, const at::Tensor& eps,
                                             const c10::optional<at::Tensor>& scale,
                                             const c10::optional<at::Tensor>& shift) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 2, "x must have shape (N, C, *), got ", x.sizes());
  check_like(eps, "eps", x, "x");
  TORCH_CHECK(eps.numel() == 1 || eps.sizes() == x.sizes(), "eps must have one element or the ",
              "shape of x ", x.sizes(), ", got ", eps.sizes());
  const int64_t channels = x.size(1);
  auto per_channel = [&](const c10::optional<at::Tensor>& t, const char* name, double identity) {
    if (!t) return at::full({channels}, identity, x.options());
    check_like(*t, name, x, "x");
    TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, name, " must have shape (C,) = (",
                channels, ",), got ", t->sizes());
    return t->contiguous();
  };
  const at::Tensor s = per_channel(scale, "scale", 1.0), t = per_channel(shift, "shift", 0.0);
  return with_backend(x, [&](auto tag) {
    return IntervalKernels<typename decltype(tag)::type>::input_box(x.contiguous(), eps.contiguous(), s, t);
  });
}

// Linear layers accept any leading batch dimensions, like torch.nn.functional.linear: they
// are flattened into one for the GEMM and restored on the way out.
std::tuple<at::Tensor, at::Tensor> interval_linear(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight_pair, bool relu_in, bool out_bounds,
    bool check_radius) {
  check_interval_args(center, radius, weight, bias, mask, weight_pair, 2);
  TORCH_CHECK(center.dim() >= 1 && center.size(-1) == weight.size(1), "center's last dimension ",
              "must equal weight.size(1) (in_features = ", weight.size(1), "), got shape ",
              center.sizes());
  std::vector<int64_t> out_shape(center.sizes().begin(), center.sizes().end() - 1);
  out_shape.push_back(weight.size(0));
  const int64_t rows = linear_rows(center), in = weight.size(1);
  auto [c, r] = dense_alike(center.reshape({rows, in}), radius.reshape({rows, in}));
  auto [a, b] = affine_forward(LinearContraction{}, c, r, weight, bias, mask, weight_pair, relu_in,
                               out_bounds, check_radius);
  return {a.view(out_shape), b.view(out_shape)};
}

Grads5 interval_linear_backward(const at::Tensor& grad_a, const at::Tensor& grad_b,
                                const at::Tensor& center, const at::Tensor& radius,
                                const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                                const c10::optional<at::Tensor>& weight_pair, bool relu_in,
                                bool out_bounds, std::array<bool, 5> output_mask) {
  check_interval_args(center, radius, weight, c10::nullopt, mask, weight_pair, 2);
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(center.dim() >= 1 && center.size(-1) == in, "center's last dimension must equal ",
              "weight.size(1) (in_features = ", in, "), got shape ", center.sizes());
  const int64_t rows = linear_rows(center);
  TORCH_CHECK(grad_a.numel() == rows * out && grad_b.sizes() == grad_a.sizes(),
              "grad_a and grad_b must have the layer's output shape (*center.shape[:-1], ", out,
              ") for center of shape ", center.sizes(), ", got ", grad_a.sizes(), " and ", grad_b.sizes());
  auto [c, r] = dense_alike(center.reshape({rows, in}), radius.reshape({rows, in}));
  auto grads = affine_backward(LinearContraction{}, grad_a.reshape({rows, out}), grad_b.reshape({rows, out}),
                               c, r, weight, mask, weight_pair, relu_in, out_bounds, output_mask);
  if (output_mask[0]) std::get<0>(grads) = std::get<0>(grads).view(center.sizes());
  if (output_mask[1]) std::get<1>(grads) = std::get<1>(grads).view(center.sizes());
  return grads;
}

std::tuple<at::Tensor, at::Tensor> interval_conv2d(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& weight_pair, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool relu_in, bool out_bounds, bool check_radius) {
  check_interval_args(center, radius, weight, bias, mask, weight_pair, 4);
  check_conv_input(center, weight, stride, padding, dilation, groups);
  auto [c, r] = dense_alike(center, radius);
  return affine_forward(Conv2dContraction{stride, padding, dilation, groups}, c, r, weight, bias,
                        mask, weight_pair, relu_in, out_bounds, check_radius);
}

Grads5 interval_conv2d_backward(const at::Tensor& grad_a, const at::Tensor& grad_b,
                                const at::Tensor& center, const at::Tensor& radius,
                                const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                                const c10::optional<at::Tensor>& weight_pair,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, bool relu_in,
                                bool out_bounds, std::array<bool, 5> output_mask) {
  check_interval_args(center, radius, weight, c10::nullopt, mask, weight_pair, 4);
  check_conv_input(center, weight, stride, padding, dilation, groups);
  std::vector<int64_t> out_shape{center.size(0), weight.size(0)};
  for (int d = 0; d < 2; ++d)
    out_shape.push_back(conv_output_size(center.size(2 + d), weight.size(2 + d), stride[d], padding[d], dilation[d]));
  TORCH_CHECK(grad_a.sizes() == at::IntArrayRef(out_shape) && grad_b.sizes() == grad_a.sizes(),
              "grad_a and grad_b must have the layer's output shape ", at::IntArrayRef(out_shape),
              ", got ", grad_a.sizes(), " and ", grad_b.sizes());
  auto [c, r] = dense_alike(center, radius);
  return affine_backward(Conv2dContraction{stride, padding, dilation, groups}, grad_a, grad_b, c,
                         r, weight, mask, weight_pair, relu_in, out_bounds, output_mask);
}

}  // namespace robprune
