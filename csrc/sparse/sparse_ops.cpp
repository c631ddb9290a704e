// The sparse family's ops: argument checks, then the algorithm. The dense path of
// masked_linear / masked_conv2d (both devices) is a layer of one product (contractions.h) on the
// effective weight, its weight and mask gradients made in one pass by the interval family's
// masked_weight_grad; linear and conv2d share it, templated on the contraction. The compressed
// path (both devices) lays its operands out as planes (sparse_planes.h), turns the kept weights
// into entry lists (sparse_index.h) and runs the products of sparse_kernels.h over them, with the
// kernels of the operands' device (with_kernels); everything around them is ATen ops.
#include "sparse_ops.h"

#include "../interval/interval_kernels.h"
#include "../interval/interval_ops.h"
#include "sparse_index.h"
#include "sparse_kernels.h"
#include "sparse_planes.h"
#include "sparse_buffers.h"

#include <robprune/backend.h>
#include <robprune/checks.h>
#include <robprune/contractions.h>
#include <robprune/layer_args.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>

#include <string>
#include <utility>
#include <vector>

namespace robprune {
namespace {

// x (*, in_features) checked against the weight; returns the rows its leading dimensions hold
// (never numel / in_features, which has no answer for in_features = 0).
int64_t linear_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "x's last dimension must equal ",
              "weight.size(1) (in_features = ", weight.size(1), "), got shape ", x.sizes());
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

Conv2dContraction conv(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_dim(x, "x", 4, "(N, C, H, W)");
  check_conv_geometry(x.size(1), x.sizes().slice(2), "x", weight, stride, padding, dilation, groups);
  return Conv2dContraction{stride, padding, dilation, groups};
}

// The gradients from grad (shaped like the layer's output, laid out like x's format).
template <class Contraction>
Grads4 backward(const Contraction& k, const at::Tensor& grad, const at::Tensor& x,
                const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                const c10::optional<at::Tensor>& weight_pair, std::array<bool, 4> need) {
  const at::Tensor w = weight_like(weight, weight);
  const c10::optional<at::Tensor> m = weight_like(mask, weight);
  const bool need_w = need[1] || (need[3] && m);
  auto [g_x, g_eff, g_bias] = k.backward(grad.contiguous(x.suggest_memory_format()), x,
                                         effective_weight(w, m, weight_pair), {need[0], need_w, need[2]});
  at::Tensor g_w, g_m;
  if (need_w && m) {
    std::tie(g_w, g_m) = masked_weight_grad(weight_like(g_eff, w), w, m, need[1], need[3]);
  } else if (need_w) {
    g_w = g_eff;
  }
  return Grads4{empty_if_unused(need[0] ? g_x : at::Tensor(), x), empty_if_unused(g_w, x),
                empty_if_unused(need[2] ? g_bias : at::Tensor(), x), empty_if_unused(g_m, x)};
}

}  // namespace

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& weight_pair) {
  check_layer_args(x, "x", weight, bias, mask, weight_pair, 2);
  const int64_t rows = linear_rows(x, weight);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(weight.size(0));
  const at::Tensor y = LinearContraction{}.forward(x.reshape({rows, weight.size(1)}).contiguous(),
                                                   effective_weight(weight, mask, weight_pair), bias);
  return y.view(out_shape);
}

Grads4 masked_linear_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& weight_pair,
                              std::array<bool, 4> output_mask) {
  check_layer_args(x, "x", weight, c10::nullopt, mask, weight_pair, 2);
  check_like(grad, "grad", x, "x");
  const int64_t rows = linear_rows(x, weight);
  TORCH_CHECK(grad.dim() == x.dim() && grad.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1) &&
                  grad.size(-1) == weight.size(0),
              "grad must have masked_linear's output shape, got ", grad.sizes());
  auto grads = backward(LinearContraction{}, grad.reshape({rows, weight.size(0)}),
                        x.reshape({rows, weight.size(1)}).contiguous(), weight, mask, weight_pair,
                        output_mask);
  if (output_mask[0]) std::get<0>(grads) = std::get<0>(grads).view(x.sizes());
  return grads;
}

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& weight_pair, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_layer_args(x, "x", weight, bias, mask, weight_pair, 4);
  return conv(x, weight, stride, padding, dilation, groups)
      .forward(x, effective_weight(weight, mask, weight_pair), bias);
}

Grads4 masked_conv2d_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& weight_pair, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              std::array<bool, 4> output_mask) {
  check_layer_args(x, "x", weight, c10::nullopt, mask, weight_pair, 4);
  check_like(grad, "grad", x, "x");
  const Conv2dContraction k = conv(x, weight, stride, padding, dilation, groups);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0),
              "grad must have masked_conv2d's output shape, got ", grad.sizes());
  return backward(k, grad, x, weight, mask, weight_pair, output_mask);
}

// --- the compressed path -----------------------------------------------------------------------

namespace {

constexpr const char* kRadiusMessage =
    "radius must be >= 0 everywhere (no negative or NaN entries); build a box from bounds with "
    "robprune_fast.ops.box_from_bounds(lower, upper)";

template <class T>
const T* data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <class T>
T* mutable_data(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

void check_bias(const c10::optional<at::Tensor>& bias, int64_t out, const at::Tensor& ref, const char* ref_name) {
  if (!bias) return;
  check_like(*bias, "bias", ref, ref_name);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must have shape (", out, ",), got ", bias->sizes());
}

void check_box(const at::Tensor& center, const at::Tensor& radius) {
  check_float(center, "center");
  check_like(radius, "radius", center, "center");
  check_same_shape(radius, "radius", center, "center");
}

// The checks of a compressed linear layer's input x (N, in_features) (named x_name), values,
// bias and CSR (out_features rows); returns the CSR.
Csr check_linear_args(const at::Tensor& x, const char* x_name, const at::Tensor& values,
                      const c10::optional<at::Tensor>& bias, const at::Tensor& row_ptr, const at::Tensor& col,
                      int64_t out_features) {
  check_dim(x, x_name, 2, "(N, in_features)");
  check_values(values, x, x_name);
  TORCH_CHECK(out_features >= 0, "out_features must be non-negative, got ", out_features);
  check_bias(bias, out_features, x, x_name);
  const std::string in_features = c10::str("in_features = ", x_name, ".size(1)");
  return check_csr(row_ptr, col, values.numel(), out_features, x.size(1), "out_features", in_features.c_str(), x,
                   x_name);
}

// The gradients of an op's two outputs, each shaped like `shape`.
void check_grads(const at::Tensor& grad_a, const at::Tensor& grad_b, const at::Tensor& ref, at::IntArrayRef shape,
                 const char* op) {
  check_like(grad_a, "grad_a", ref, "center");
  check_like(grad_b, "grad_b", ref, "center");
  TORCH_CHECK(grad_a.sizes() == shape && grad_b.sizes() == shape, "grad_a and grad_b must have the shape of ", op,
              "'s outputs ", shape, ", got ", grad_a.sizes(), " and ", grad_b.sizes());
}

// The gradient of the input box's ReLU (relu_in), given that of its output: (g_c, g_r) laid out
// like the box. Run on the box's device, as with_kernels does.
std::tuple<at::Tensor, at::Tensor> relu_backward(const at::Tensor& g_c, const at::Tensor& g_r, const at::Tensor& center,
                                                 const at::Tensor& radius) {
  const c10::OptionalDeviceGuard guard(at::device_of(center));
  return with_backend(center, [&](auto tag) {
    return IntervalKernels<typename decltype(tag)::type>::prologue_backward(g_c, g_r, center.contiguous(),
                                                                           radius.contiguous());
  });
}

PackOp box_op(bool relu_in, bool check_radius) {
  return relu_in ? PackOp::kReluBox : check_radius ? PackOp::kCheckBox : PackOp::kCopy;
}

// Whether a layer's forward keeps its input planes (a linear layer's transposed rows) for the
// backward (sparse_planes.h): autograd will ask for the weights' gradient, which reads them.
PlanesUse forward_planes(const at::Tensor& values) {
  return values.requires_grad() ? PlanesUse::kKeep : PlanesUse::kScratch;
}

// The entry lists of a Product or a Dot over batch-contiguous rows: `channels` one-row planes
// of n columns, channel o's entries [ptr[o], ptr[o + 1]), entry e reading row index[e] (rows ld
// apart).
template <class T>
void set_batch_entries(EntryLists<T>& p, const at::Tensor& ptr, const at::Tensor& index, int64_t ld, int64_t n) {
  p.channels = ptr.numel() - 1;
  p.cols = n;
  p.start = ptr.const_data_ptr<int32_t>();
  p.entries = index.numel();
  p.indexed = true;
  p.index = index.const_data_ptr<int32_t>();
  p.index_stride = ld;
}

// A Product over batch-contiguous rows (a linear layer or its transpose), entry e reading input
// row index[e] with weight w[e] (w[perm[e]] with perm: a CSC walked over CSR-ordered values),
// written to out (and out1) as (n, channels), the layer's layout.
template <class T>
Product<T> batch_problem(const at::Tensor& ptr, const at::Tensor& index, int64_t in_rows, const at::Tensor& w,
                         const int32_t* perm, const Batch& in, int64_t n, T* out, T* out1, const T* bias,
                         bool out_bounds) {
  Product<T> p;
  set_batch_entries(p, ptr, index, in.ld, n);
  p.w = w.const_data_ptr<T>();
  p.perm = perm;
  p.index_rows = in_rows;
  p.col_stride = in.col_stride;
  p.in = data<T>(in.rows.a);
  p.in1 = data<T>(in.rows.b);
  p.out = out;
  p.out1 = out1;
  p.out_row = p.channels;
  p.bias = bias;
  p.interval = in.rows.b.defined();
  p.out_bounds = out_bounds;
  p.overread = true;
  return p;
}

template <class T>
void batch_product(const at::Tensor& ptr, const at::Tensor& index, int64_t in_rows, const at::Tensor& w,
                   const int32_t* perm, const Batch& in, int64_t n, T* out, T* out1, const T* bias, bool out_bounds) {
  const Product<T> p = batch_problem<T>(ptr, index, in_rows, w, perm, in, n, out, out1, bias, out_bounds);
  with_kernels(ptr, [&](auto k) { decltype(k)::product(p); });
}

// A Dot over batch-contiguous rows: dw (in the values' order) from the output gradient g (out
// rows) and the input x (in rows), over the CSC: channel c holds input row c, which its entries
// multiply by the rows of g, small enough to stay in L2 (out_features x N, where the input's
// in_features x N would not), with one lane sum per kept weight. values: the weights, read for
// their sign (interval only).
template <class T>
void batch_dot(const Csc& csc, const Batch& g, const Batch& x, int64_t n, const at::Tensor& values, T* dw) {
  Dot<T> p;
  set_batch_entries(p, csc.col_ptr, csc.row, g.ld, n);
  p.w = data<T>(values);
  p.perm = csc.csc_to_csr.const_data_ptr<int32_t>();
  p.g = data<T>(x.rows.a);
  p.g1 = data<T>(x.rows.b);
  p.g_channel = x.ld;
  p.in = data<T>(g.rows.a);
  p.in1 = data<T>(g.rows.b);
  p.dw = dw;
  p.interval = g.rows.b.defined();
  with_kernels(csc.col_ptr, [&](auto k) { decltype(k)::dot(p); });
}

}  // namespace

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& row_ptr, const at::Tensor& col, int64_t out_features) {
  check_float(x, "x");
  const Csr csr = check_linear_args(x, "x", values, bias, row_ptr, col, out_features);
  const PlanesUse use = forward_planes(values);
  const Batch in = reads_rows_in_place(x, use) ? sample_rows(x, at::Tensor(), PackOp::kCopy)
                                               : batch_rows(x, at::Tensor(), PackOp::kCopy, Scratch::kInput, use);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor(), v = values.contiguous();
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "robprune_sparse_linear", [&] {
    batch_product<scalar_t>(csr.row_ptr, csr.col, x.size(1), v, nullptr, in, x.size(0), mutable_data<scalar_t>(y),
                            nullptr, data<scalar_t>(b), false);
  });
  return y;
}

at::Tensor sparse_linear_t(const at::Tensor& g, const at::Tensor& values, const at::Tensor& col_ptr,
                           const at::Tensor& row, const at::Tensor& csc_to_csr, int64_t in_features) {
  check_float(g, "g");
  check_dim(g, "g", 2, "(N, out_features)");
  check_values(values, g, "g");
  TORCH_CHECK(in_features >= 0, "in_features must be non-negative, got ", in_features);
  const Csc csc = check_csc(col_ptr, row, csc_to_csr, values.numel(), g.size(1), in_features,
                            "out_features = g.size(1)", "in_features", g, "g");
  const Batch in = batch_rows(g, at::Tensor(), PackOp::kCopy, Scratch::kGradient);
  const at::Tensor w = values.contiguous();
  at::Tensor x = at::empty({g.size(0), in_features}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "robprune_sparse_linear_t", [&] {
    batch_product<scalar_t>(csc.col_ptr, csc.row, g.size(1), w, csc.csc_to_csr.const_data_ptr<int32_t>(), in,
                            g.size(0), mutable_data<scalar_t>(x), nullptr, nullptr, false);
  });
  return x;
}

at::Tensor sparse_linear_values_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& col_ptr,
                                     const at::Tensor& row, const at::Tensor& csc_to_csr) {
  check_float(g, "g");
  check_dim(g, "g", 2, "(N, out_features)");
  check_like(x, "x", g, "g");
  check_dim(x, "x", 2, "(N, in_features)");
  TORCH_CHECK(x.size(0) == g.size(0), "x must have g's batch size ", g.size(0), ", got ", x.size(0));
  TORCH_CHECK(row.dim() == 1, "row must be 1-D (one row per kept weight), got shape ", row.sizes());
  const int64_t nnz = row.size(0);
  const Csc csc = check_csc(col_ptr, row, csc_to_csr, nnz, g.size(1), x.size(1), "out_features = g.size(1)",
                            "in_features = x.size(1)", g, "g");
  const Batch gb = batch_rows(g, at::Tensor(), PackOp::kCopy, Scratch::kGradient);
  const Batch xb = batch_rows(x, at::Tensor(), PackOp::kCopy, Scratch::kInput);
  at::Tensor dw = at::empty({nnz}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "robprune_sparse_linear_values_grad", [&] {
    batch_dot<scalar_t>(csc, gb, xb, g.size(0), at::Tensor(), mutable_data<scalar_t>(dw));
  });
  return dw;
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& values, const at::Tensor& col_ptr,
                                                          const at::Tensor& row, const at::Tensor& csc_to_csr,
                                                          std::array<bool, 2> need) {
  check_float(grad, "grad");
  check_dim(grad, "grad", 2, "(N, out_features)");
  check_like(x, "x", grad, "grad");
  check_dim(x, "x", 2, "(N, in_features)");
  TORCH_CHECK(x.size(0) == grad.size(0), "x must have grad's batch size ", grad.size(0), ", got ", x.size(0));
  check_values(values, grad, "grad");
  const int64_t n = grad.size(0), in_features = x.size(1), out_features = grad.size(1);
  const Csc csc = check_csc(col_ptr, row, csc_to_csr, values.numel(), out_features, in_features,
                            "out_features = grad.size(1)", "in_features = x.size(1)", grad, "grad");
  const Batch g = batch_rows(grad, at::Tensor(), PackOp::kCopy, Scratch::kGradient);
  const Batch xb = batch_rows(x, at::Tensor(), PackOp::kCopy, Scratch::kInput, PlanesUse::kReuse);
  const at::Tensor w = values.contiguous();
  at::Tensor g_x = at::empty({n, in_features}, x.options()), g_v = at::empty({values.numel()}, values.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "robprune_sparse_linear_backward", [&] {
    // sparse_linear_t's product, with the values' gradient riding along (sparse_kernels.h).
    Product<scalar_t> p = batch_problem<scalar_t>(csc.col_ptr, csc.row, out_features, w,
                                                  csc.csc_to_csr.const_data_ptr<int32_t>(), g, n,
                                                  mutable_data<scalar_t>(g_x), nullptr, nullptr, false);
    p.self = data<scalar_t>(xb.rows.a);
    p.self_row = xb.ld;
    p.dw = mutable_data<scalar_t>(g_v);
    with_kernels(grad, [&](auto k) { decltype(k)::product(p); });
  });
  return {need[0] ? g_x : at::empty({0}, x.options()), need[1] ? g_v : at::empty({0}, x.options())};
}

namespace {

// W2's rows (weight.size(0)) and columns (the other dimensions' product) of a weight (named name).
std::pair<int64_t, int64_t> weight_rows(const at::Tensor& weight, const char* name) {
  check_float(weight, name);
  TORCH_CHECK(weight.dim() >= 1, name, " must have at least one dimension (out, ...), got a scalar");
  int64_t cols = 1;
  for (int64_t d = 1; d < weight.dim(); ++d) cols *= weight.size(d);
  return {weight.size(0), cols};
}

template <class T>
Kept<T> kept(const Csr& csr, int64_t rows, int64_t cols, const at::Tensor& dense, const at::Tensor& values) {
  Kept<T> p;
  p.rows = rows;
  p.cols = cols;
  p.entries = values.numel();
  p.row_ptr = csr.row_ptr.const_data_ptr<int32_t>();
  p.col = csr.col.const_data_ptr<int32_t>();
  p.dense = const_cast<T*>(dense.const_data_ptr<T>());  // written by scatter only
  p.values = const_cast<T*>(values.const_data_ptr<T>());  // written by gather only
  return p;
}

}  // namespace

at::Tensor sparse_gather(const at::Tensor& weight, const at::Tensor& row_ptr, const at::Tensor& col) {
  const std::pair<int64_t, int64_t> shape = weight_rows(weight, "weight");
  const int64_t rows = shape.first, cols = shape.second;
  TORCH_CHECK(col.dim() == 1, "col must be 1-D (one column per kept weight), got shape ", col.sizes());
  TORCH_CHECK(col.numel() < (int64_t(1) << 31), "col must hold fewer than 2^31 weights, got ", col.numel());
  const Csr csr = check_csr(row_ptr, col, col.numel(), rows, cols, "weight.size(0)",
                            "the product of weight's other dimensions", weight, "weight");
  const at::Tensor w = weight.contiguous();  // logical order: a channels-last weight is copied
  at::Tensor values = at::empty({col.numel()}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "robprune_sparse_gather", [&] {
    const Kept<scalar_t> p = kept<scalar_t>(csr, rows, cols, w, values);
    with_kernels(weight, [&](auto k) { decltype(k)::gather(p); });
  });
  return values;
}

void sparse_scatter_(const at::Tensor& out, const at::Tensor& values, const at::Tensor& row_ptr,
                     const at::Tensor& col) {
  const std::pair<int64_t, int64_t> shape = weight_rows(out, "out");
  const int64_t rows = shape.first, cols = shape.second;
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous (it is written as out.view(out.size(0), -1)), got "
              "strides ", out.strides());
  check_values(values, out, "out");
  const Csr csr = check_csr(row_ptr, col, values.numel(), rows, cols, "out.size(0)",
                            "the product of out's other dimensions", out, "out");
  const at::Tensor v = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "robprune_sparse_scatter_", [&] {
    const Kept<scalar_t> p = kept<scalar_t>(csr, rows, cols, out, v);
    with_kernels(out, [&](auto k) { decltype(k)::scatter(p); });
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_interval_linear(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& values,
    const c10::optional<at::Tensor>& bias, const at::Tensor& row_ptr, const at::Tensor& col,
    int64_t out_features, bool relu_in, bool out_bounds, bool check_radius) {
  check_box(center, radius);
  const Csr csr = check_linear_args(center, "center", values, bias, row_ptr, col, out_features);
  const int64_t n = center.size(0);
  const PlanesUse use = forward_planes(values);
  const PackOp op = box_op(relu_in, check_radius);
  const Batch in = reads_rows_in_place(center, use) ? sample_rows(center, radius, op)
                                                    : batch_rows(center, radius, op, Scratch::kInput, use);
  TORCH_CHECK(!(check_radius && in.rows.bad), kRadiusMessage);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor(), v = values.contiguous();
  at::Tensor a = at::empty({n, out_features}, center.options()), z = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(center.scalar_type(), "robprune_sparse_interval_linear", [&] {
    batch_product<scalar_t>(csr.row_ptr, csr.col, center.size(1), v, nullptr, in, n, mutable_data<scalar_t>(a),
                            mutable_data<scalar_t>(z), data<scalar_t>(b), out_bounds);
  });
  return {a, z};
}

Grads4 sparse_interval_linear_backward(const at::Tensor& grad_a, const at::Tensor& grad_b,
                                       const at::Tensor& center, const at::Tensor& radius,
                                       const at::Tensor& values, const at::Tensor& row_ptr,
                                       const at::Tensor& col, const at::Tensor& col_ptr,
                                       const at::Tensor& row, const at::Tensor& csc_to_csr, bool relu_in,
                                       bool out_bounds, std::array<bool, 4> need) {
  check_box(center, radius);
  check_dim(center, "center", 2, "(N, in_features)");
  check_values(values, center, "center");
  const int64_t n = center.size(0), in_features = center.size(1), out_features = segments(row_ptr, "row_ptr");
  check_grads(grad_a, grad_b, center, {n, out_features}, "sparse_interval_linear");
  const Csr csr = check_csr(row_ptr, col, values.numel(), out_features, in_features, "out_features",
                            "in_features = center.size(1)", center, "center");
  const Csc csc = check_csc(col_ptr, row, csc_to_csr, values.numel(), out_features, in_features, "out_features",
                            "in_features = center.size(1)", center, "center");
  // The gradients of the output's centre and radius, (out_features, n) each.
  const Batch g = batch_rows(grad_a, grad_b, out_bounds ? PackOp::kBoundsGrad : PackOp::kCopy, Scratch::kGradient);
  const at::Tensor v = values.contiguous();
  at::Tensor g_c, g_r, g_v, g_bias;
  if (need[3]) g_bias = g.rows.a.narrow(0, 0, out_features * g.ld).view({out_features, g.ld}).sum(1);
  // The layer's input box as the forward's product read it (through its ReLU), for the values'
  // gradient.
  const Batch x = need[2] ? batch_rows(center, radius, relu_in ? PackOp::kReluBox : PackOp::kCopy, Scratch::kInput,
                                       PlanesUse::kReuse)
                          : Batch{};
  if (need[2]) g_v = at::empty({values.numel()}, values.options());
  if (need[0] || need[1]) {
    g_c = at::empty({n, in_features}, center.options());
    g_r = at::empty_like(g_c);
    AT_DISPATCH_FLOATING_TYPES(center.scalar_type(), "robprune_sparse_interval_linear_backward", [&] {
      // sparse_interval_linear's transposed product, the values' gradient riding along
      // (sparse_kernels.h): the output gradient's rows read once for both.
      Product<scalar_t> p = batch_problem<scalar_t>(csc.col_ptr, csc.row, out_features, v,
                                                    csc.csc_to_csr.const_data_ptr<int32_t>(), g, n,
                                                    mutable_data<scalar_t>(g_c), mutable_data<scalar_t>(g_r), nullptr,
                                                    false);
      if (need[2]) {
        p.self = data<scalar_t>(x.rows.a);
        p.self1 = data<scalar_t>(x.rows.b);
        p.self_row = x.ld;
        p.dw = mutable_data<scalar_t>(g_v);
      }
      with_kernels(grad_a, [&](auto k) { decltype(k)::product(p); });
    });
    if (relu_in) std::tie(g_c, g_r) = relu_backward(g_c, g_r, center, radius);
  } else if (need[2]) {
    AT_DISPATCH_FLOATING_TYPES(center.scalar_type(), "robprune_sparse_interval_linear_backward", [&] {
      batch_dot<scalar_t>(csc, g, x, n, v, mutable_data<scalar_t>(g_v));
    });
  }
  return {empty_if_unused(need[0] ? g_c : at::Tensor(), center), empty_if_unused(need[1] ? g_r : at::Tensor(), center),
          empty_if_unused(g_v, center), empty_if_unused(g_bias, center)};
}

namespace {

// The layout of a convolution with a weight (out_channels, channels / groups, kernel_size) over
// an input (images, channels, size), the input named input_name in messages.
ConvLayout conv_layout(int64_t images, int64_t channels, at::IntArrayRef size, const char* input_name,
                       int64_t out_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] > 0 && kernel_size[1] > 0,
              "kernel_size must be two positive ints, got ", kernel_size);
  TORCH_CHECK(groups > 0, "groups must be positive, got ", groups);
  TORCH_CHECK(channels >= groups && channels % groups == 0, input_name, " has ", channels,
              " channels, which groups = ", groups, " must divide (at least one channel per group)");
  TORCH_CHECK(out_channels >= 1, "row_ptr must describe at least one output channel (out_channels + 1 >= 2 entries)");
  const std::array<int64_t, 4> weight{out_channels, channels / groups, kernel_size[0], kernel_size[1]};
  check_conv_geometry(channels, size, input_name, weight, stride, padding, dilation, groups);
  return ConvLayout{images, channels, out_channels, groups,
                    ConvAxis{size[0], kernel_size[0], stride[0], padding[0], dilation[0]},
                    ConvAxis{size[1], kernel_size[1], stride[1], padding[1], dilation[1]}};
}

ConvLayout conv_layout(const at::Tensor& x, const char* name, int64_t out_channels, at::IntArrayRef kernel_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_dim(x, name, 4, "(N, C, H, W)");
  return conv_layout(x.size(0), x.size(1), x.sizes().slice(2), name, out_channels, kernel_size, stride, padding,
                     dilation, groups);
}

std::vector<int64_t> output_shape(const ConvLayout& l) {
  return {l.images, l.out_channels, l.h.out(), l.w.out()};
}

// The convolution's compressed weight for the entry kernels (sparse_kernels.h).
ConvIndex conv_index(const ConvLayout& l, const at::Tensor& ptr, const at::Tensor& inner, const at::Tensor& perm) {
  ConvIndex index;
  index.layout = l;
  index.ptr = ptr.const_data_ptr<int32_t>();
  index.inner = inner.const_data_ptr<int32_t>();
  index.perm = perm.defined() ? perm.const_data_ptr<int32_t>() : nullptr;
  index.segments = ptr.numel() - 1;
  index.entries = inner.numel();
  return index;
}

// The forward product's entries: the CSR's rows as channels, entry e reading its input planes
// at the kept weight's offset, with weight values[e] (values may be undefined where the kernel
// needs no weights).
Entries forward_entries(const Csr& csr, const at::Tensor& values, const ConvLayout& l) {
  at::Tensor off = at::empty({csr.col.numel()}, csr.col.options().dtype(at::kLong));
  with_kernels(off, [&](auto k) {
    decltype(k)::forward_offsets(conv_index(l, csr.row_ptr, csr.col, at::Tensor()), off.mutable_data_ptr<int64_t>());
  });
  return {csr.row_ptr, values.defined() ? values.contiguous() : values, off};
}

// The transposed convolution's entries. Channel (c, a, b) is the input's phase (a, b) of
// channel c (plain channel c for stride 1); its entries are the kept weights (o, c, i, j) of
// the taps with phase(i) = a, phase(j) = b, o in c's group, each reading the gradient planes of
// channel o shifted back by the tap (the adjoint of the forward entry), from the first element
// of the phase's region on (ConvLayout::transposed_offset). Two passes on the index's device:
// the channels' counts, then (after their running sums) the entries.
Entries transposed_entries(const Csc& csc, const at::Tensor& values, const ConvLayout& l) {
  const int64_t channels = l.in_channels * l.phases(), nnz = values.numel();
  const ConvIndex index = conv_index(l, csc.col_ptr, csc.row, csc.csc_to_csr);
  at::Tensor start = at::zeros({channels + 1}, csc.col_ptr.options());
  at::Tensor off = at::empty({nnz}, csc.col_ptr.options().dtype(at::kLong));
  at::Tensor w = at::empty({nnz}, values.options());
  const at::Tensor v = values.contiguous();
  at::Tensor counts = start.narrow(0, 1, channels);
  with_kernels(start, [&](auto k) { decltype(k)::transposed_counts(index, counts.mutable_data_ptr<int32_t>()); });
  counts.copy_(counts.cumsum(0));
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "robprune_sparse_transposed_entries", [&] {
    with_kernels(start, [&](auto k) {
      decltype(k)::transposed_entries(index, v.const_data_ptr<scalar_t>(), start.const_data_ptr<int32_t>(),
                                      w.mutable_data_ptr<scalar_t>(), off.mutable_data_ptr<int64_t>());
    });
  });
  return {start, w, off};
}

// The entry lists of a Product or a Dot (P) over a convolution, with their weights: the entries
// en, reading the planes `in` (images in_image apart, rows in_row apart).
template <class T, class P>
void set_plane_entries(P& p, const Entries& en, const Planes& in, int64_t in_image, int64_t in_row) {
  p.start = en.start.const_data_ptr<int32_t>();
  p.entries = en.off.numel();
  p.w = data<T>(en.w);
  p.off = en.off.const_data_ptr<int64_t>();
  p.in = data<T>(in.a);
  p.in1 = data<T>(in.b);
  p.in_image = in_image;
  p.in_row = in_row;
}

// The same for the forward entries: the layer's output planes, reading its input planes.
template <class T, class P>
void set_forward_entries(P& p, const Entries& en, const ConvLayout& l, const Planes& in) {
  p.images = l.images;
  p.channels = l.out_channels;
  p.rows = l.h.out();
  p.cols = l.w.out();
  set_plane_entries<T>(p, en, in, l.in_channels * l.phases() * l.plane_q(), l.cols_q());
}

template <class T>
void forward_product(const Entries& en, const ConvLayout& l, const Planes& in, T* out, T* out1, const T* bias,
                     bool out_bounds) {
  Product<T> p;
  set_forward_entries<T>(p, en, l, in);
  p.out = out;
  p.out1 = out1;
  p.out_image = l.out_channels * p.rows * p.cols;
  p.out_channel = p.rows * p.cols;
  p.out_row = p.cols;
  p.bias = bias;
  p.interval = in.b.defined();
  p.out_bounds = out_bounds;
  p.overread = true;
  with_kernels(en.off, [&](auto k) { decltype(k)::product(p); });
}

// Stride 1: the transposed products write the input (N, C, H, W) itself (the one phase's
// region); else the regions of its phases, which unphase() interleaves.
bool writes_input(const ConvLayout& l) {
  return l.phases() == 1;
}

template <class T>
void transposed_product(const Entries& en, const ConvLayout& l, const Planes& g, T* out, T* out1) {
  Product<T> p;
  p.images = l.images;
  p.channels = l.in_channels * l.phases();
  p.rows = l.region_rows();
  p.cols = l.region_cols();
  set_plane_entries<T>(p, en, g, l.out_channels * l.plane_g(), l.cols_g());
  p.out = out;
  p.out1 = out1;
  p.out_channel = p.rows * p.cols;
  p.out_image = p.channels * p.out_channel;
  p.out_row = p.cols;
  p.interval = g.b.defined();
  p.overread = true;
  with_kernels(en.off, [&](auto k) { decltype(k)::product(p); });
}

// Where the products write an (N, C, H, W) result: the op's output itself (fresh) when it is
// final, else a scratch buffer that a later pass (another memory format, a ReLU's gradient)
// turns into the output.
at::Tensor nchw_result(at::IntArrayRef shape, const at::TensorOptions& options, bool final, Scratch slot) {
  if (final) return fresh(shape, options);
  return scratch(slot, c10::multiply_integers(shape), options).view(shape);
}

// The result in `format`: a fresh copy of a scratch buffer (scratch never leaves an op), or the
// result itself, reformatted when needed.
at::Tensor released(const at::Tensor& result, bool from_scratch, at::MemoryFormat format) {
  if (!from_scratch) return result.contiguous(format);
  return fresh(result.sizes(), result.options(), format).copy_(result);
}

// Elements after the phases' regions that Unphase's CPU kernels may read (a vector of either
// dtype past the last row).
constexpr int64_t kRegionSlack = 64;

// The input's buffer the transposed products write: (N, C, H, W) (as nchw_result), or its
// phases' regions (scratch, unphase() makes the input from them).
at::Tensor transposed_output(const ConvLayout& l, const at::TensorOptions& options, bool final, Scratch slot) {
  if (writes_input(l)) return nchw_result({l.images, l.in_channels, l.h.in, l.w.in}, options, final, slot);
  const int64_t n = l.images * l.in_channels * l.phases() * l.region_rows() * l.region_cols();
  return scratch(slot, n + kRegionSlack, options);
}

// (N, C, H, W) from the phases' regions z (and z1), fresh; with a box (center, radius), the
// gradient through its ReLU (relu_in) in the same pass.
std::tuple<at::Tensor, at::Tensor> unphase(const at::Tensor& z, const at::Tensor& z1, const ConvLayout& l,
                                           const at::Tensor& center, const at::Tensor& radius) {
  const std::vector<int64_t> shape{l.images, l.in_channels, l.h.in, l.w.in};
  const at::Tensor out = fresh(shape, z.options()), out1 = z1.defined() ? fresh(shape, z.options()) : at::Tensor();
  const at::Tensor c = center.defined() ? center.contiguous() : center;
  const at::Tensor r = radius.defined() ? radius.contiguous() : radius;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "robprune_sparse_unphase", [&] {
    Unphase<scalar_t> p;
    p.images = l.images;
    p.channels = l.in_channels;
    p.height = l.h.in;
    p.width = l.w.in;
    p.stride_h = l.h.stride;
    p.stride_w = l.w.stride;
    p.pad_h = l.h.pad;
    p.pad_w = l.w.pad;
    p.rows = l.region_rows();
    p.cols = l.region_cols();
    p.z = data<scalar_t>(z);
    p.z1 = data<scalar_t>(z1);
    p.center = data<scalar_t>(c);
    p.radius = data<scalar_t>(r);
    p.out = mutable_data<scalar_t>(out);
    p.out1 = mutable_data<scalar_t>(out1);
    with_kernels(z, [&](auto k) { decltype(k)::unphase(p); });
  });
  return {out, out1};
}

// A pointer to the region (the output gradient itself) of gradient planes.
template <class T>
const T* gradient_region(const at::Tensor& planes, const ConvLayout& l) {
  return planes.defined() ? data<T>(planes) + l.h.max_shift() * l.cols_g() + l.w.max_shift() : nullptr;
}

template <class T>
void forward_dot(const Entries& en, const ConvLayout& l, const T* g, const T* g1, int64_t g_image, int64_t g_channel,
                 int64_t g_row, const Planes& in, T* dw, T* db = nullptr) {
  Dot<T> p;
  set_forward_entries<T>(p, en, l, in);
  p.g = g;
  p.g1 = g1;
  p.g_image = g_image;
  p.g_channel = g_channel;
  p.g_row = g_row;
  p.dw = dw;
  p.db = db;
  p.interval = g1 != nullptr;
  with_kernels(en.off, [&](auto k) { decltype(k)::dot(p); });
}

}  // namespace

at::Tensor sparse_conv2d(const at::Tensor& x, const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& row_ptr, const at::Tensor& col, at::IntArrayRef kernel_size,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t groups) {
  check_float(x, "x");
  check_values(values, x, "x");
  const ConvLayout l =
      conv_layout(x, "x", segments(row_ptr, "row_ptr"), kernel_size, stride, padding, dilation, groups);
  check_bias(bias, l.out_channels, x, "x");
  const Csr csr = check_csr(row_ptr, col, values.numel(), l.out_channels, l.columns(),
                            "out_channels", "C_in / groups * kH * kW", x, "x");
  const Planes in = input_planes(x, at::Tensor(), l, PackOp::kCopy, forward_planes(values));
  const Entries en = forward_entries(csr, values, l);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const auto format = x.suggest_memory_format();
  const bool nchw = format == at::MemoryFormat::Contiguous;
  const at::Tensor y = nchw_result(output_shape(l), x.options(), nchw, Scratch::kOutput);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "robprune_sparse_conv2d", [&] {
    forward_product<scalar_t>(en, l, in, mutable_data<scalar_t>(y), nullptr, data<scalar_t>(b), false);
  });
  return released(y, !nchw, format);
}

at::Tensor sparse_conv2d_t(const at::Tensor& g, const at::Tensor& values, const at::Tensor& col_ptr,
                           const at::Tensor& row, const at::Tensor& csc_to_csr, at::IntArrayRef input_size,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  check_float(g, "g");
  check_dim(g, "g", 4, "(N, C_out, H_out, W_out)");
  check_values(values, g, "g");
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] > 0 && kernel_size[1] > 0,
              "kernel_size must be two positive ints, got ", kernel_size);
  TORCH_CHECK(groups > 0, "groups must be positive, got ", groups);
  TORCH_CHECK(input_size.size() == 2 && input_size[0] > 0 && input_size[1] > 0,
              "input_size must be two positive ints, got ", input_size);
  const int64_t taps = kernel_size[0] * kernel_size[1], cols = segments(col_ptr, "col_ptr");
  TORCH_CHECK(cols > 0 && cols % taps == 0, "col_ptr must have C_in / groups * kH * kW + 1 entries (a positive ",
              "multiple of kH * kW = ", taps, ", plus one), got ", cols + 1);
  const ConvLayout l = conv_layout(g.size(0), cols / taps * groups, input_size, "input_size", g.size(1), kernel_size,
                                   stride, padding, dilation, groups);
  TORCH_CHECK(g.size(2) == l.h.out() && g.size(3) == l.w.out(), "g's spatial size ", g.sizes().slice(2),
              " must be the layer's output size (", l.h.out(), ", ", l.w.out(), ") for input_size ", input_size);
  const Csc csc = check_csc(col_ptr, row, csc_to_csr, values.numel(), l.out_channels, cols, "out_channels = g.size(1)",
                            "C_in / groups * kH * kW", g, "g");
  const Planes gp = gradient_planes(g, at::Tensor(), l, PackOp::kCopy);
  const Entries en = transposed_entries(csc, values, l);
  const auto format = g.suggest_memory_format();
  const bool final = writes_input(l) && format == at::MemoryFormat::Contiguous;
  const at::Tensor z = transposed_output(l, g.options(), final, Scratch::kOutput);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "robprune_sparse_conv2d_t", [&] {
    transposed_product<scalar_t>(en, l, gp, mutable_data<scalar_t>(z), nullptr);
  });
  if (writes_input(l)) return released(z, !final, format);
  return std::get<0>(unphase(z, at::Tensor(), l, at::Tensor(), at::Tensor())).contiguous(format);
}

at::Tensor sparse_conv2d_values_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& row_ptr,
                                     const at::Tensor& col, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_float(x, "x");
  check_like(g, "g", x, "x");
  const ConvLayout l =
      conv_layout(x, "x", segments(row_ptr, "row_ptr"), kernel_size, stride, padding, dilation, groups);
  TORCH_CHECK(g.sizes() == at::IntArrayRef(output_shape(l)), "g must have sparse_conv2d's output shape ",
              output_shape(l), ", got ", g.sizes());
  TORCH_CHECK(col.dim() == 1, "col must be 1-D (one column per kept weight), got shape ", col.sizes());
  const Csr csr = check_csr(row_ptr, col, col.size(0), l.out_channels, l.columns(),
                            "out_channels", "C_in / groups * kH * kW", x, "x");
  const Planes in = input_planes(x, at::Tensor(), l, PackOp::kCopy, PlanesUse::kReuse);
  const Entries en = forward_entries(csr, at::Tensor(), l);
  const at::Tensor gc = g.contiguous();
  at::Tensor dw = at::empty({col.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "robprune_sparse_conv2d_values_grad", [&] {
    const int64_t plane = l.h.out() * l.w.out();
    forward_dot<scalar_t>(en, l, data<scalar_t>(gc), nullptr, l.out_channels * plane, plane, l.w.out(), in,
                          mutable_data<scalar_t>(dw));
  });
  return dw;
}

std::tuple<at::Tensor, at::Tensor> sparse_interval_conv2d(
    const at::Tensor& center, const at::Tensor& radius, const at::Tensor& values,
    const c10::optional<at::Tensor>& bias, const at::Tensor& row_ptr, const at::Tensor& col,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, bool relu_in, bool out_bounds, bool check_radius) {
  check_box(center, radius);
  check_values(values, center, "center");
  const ConvLayout l = conv_layout(center, "center", segments(row_ptr, "row_ptr"), kernel_size, stride, padding,
                                   dilation, groups);
  check_bias(bias, l.out_channels, center, "center");
  const Csr csr = check_csr(row_ptr, col, values.numel(), l.out_channels, l.columns(),
                            "out_channels", "C_in / groups * kH * kW", center, "center");
  const Planes in = input_planes(center, radius, l, box_op(relu_in, check_radius), forward_planes(values));
  TORCH_CHECK(!(check_radius && in.bad), kRadiusMessage);
  const Entries en = forward_entries(csr, values, l);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const auto format = center.suggest_memory_format();
  const bool nchw = format == at::MemoryFormat::Contiguous;
  const at::Tensor a = nchw_result(output_shape(l), center.options(), nchw, Scratch::kOutput);
  const at::Tensor z = nchw_result(output_shape(l), center.options(), nchw, Scratch::kOutput1);
  AT_DISPATCH_FLOATING_TYPES(center.scalar_type(), "robprune_sparse_interval_conv2d", [&] {
    forward_product<scalar_t>(en, l, in, mutable_data<scalar_t>(a), mutable_data<scalar_t>(z), data<scalar_t>(b),
                              out_bounds);
  });
  return {released(a, !nchw, format), released(z, !nchw, format)};
}

Grads4 sparse_interval_conv2d_backward(const at::Tensor& grad_a, const at::Tensor& grad_b,
                                       const at::Tensor& center, const at::Tensor& radius,
                                       const at::Tensor& values, const at::Tensor& row_ptr,
                                       const at::Tensor& col, const at::Tensor& col_ptr,
                                       const at::Tensor& row, const at::Tensor& csc_to_csr,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                       bool relu_in, bool out_bounds, std::array<bool, 4> need) {
  check_box(center, radius);
  check_values(values, center, "center");
  const ConvLayout l = conv_layout(center, "center", segments(row_ptr, "row_ptr"), kernel_size, stride, padding,
                                   dilation, groups);
  check_grads(grad_a, grad_b, center, output_shape(l), "sparse_interval_conv2d");
  const int64_t cols = l.columns();
  const Csr csr = check_csr(row_ptr, col, values.numel(), l.out_channels, cols, "out_channels",
                            "C_in / groups * kH * kW", center, "center");
  const Csc csc = check_csc(col_ptr, row, csc_to_csr, values.numel(), l.out_channels, cols, "out_channels",
                            "C_in / groups * kH * kW", center, "center");
  // The gradients of the output's centre and radius as gradient planes, which the transposed
  // product needs (their margins) and out_bounds makes (from those of the bounds). Without
  // either, the weights' and bias's gradients read the gradients as they are (contiguous):
  // a first layer's backward then copies nothing.
  const bool planes = need[0] || need[1] || out_bounds;
  const Planes g = planes ? gradient_planes(grad_a, grad_b, l, out_bounds ? PackOp::kBoundsGrad : PackOp::kCopy)
                          : Planes{grad_a.contiguous(), grad_b.contiguous()};
  at::Tensor g_c, g_r, g_v, g_bias;
  // The bias's gradient: summed by the values' gradient's pass over g when there is one.
  if (need[3] && need[2]) g_bias = at::empty({l.out_channels}, center.options());
  else if (need[3])
    g_bias = planes ? g.a.narrow(0, 0, l.images * l.out_channels * l.plane_g())
                          .view({l.images, l.out_channels, -1})
                          .sum(at::IntArrayRef{0, 2})
                    : g.a.sum(at::IntArrayRef{0, 2, 3});
  if (need[0] || need[1]) {
    const Entries en = transposed_entries(csc, values, l);
    const auto format = center.suggest_memory_format();
    // The products' buffers are the gradients themselves only when nothing follows them.
    const bool final = writes_input(l) && !relu_in && format == at::MemoryFormat::Contiguous;
    const at::Tensor zc = transposed_output(l, center.options(), final, Scratch::kOutput);
    const at::Tensor zr = transposed_output(l, center.options(), final, Scratch::kOutput1);
    AT_DISPATCH_FLOATING_TYPES(center.scalar_type(), "robprune_sparse_interval_conv2d_backward", [&] {
      transposed_product<scalar_t>(en, l, g, mutable_data<scalar_t>(zc), mutable_data<scalar_t>(zr));
    });
    if (!writes_input(l)) {
      // Unphased into fresh tensors, through the ReLU's gradient when there is one.
      std::tie(g_c, g_r) = relu_in ? unphase(zc, zr, l, center, radius)
                                   : unphase(zc, zr, l, at::Tensor(), at::Tensor());
      g_c = g_c.contiguous(format);
      g_r = g_r.contiguous(format);
    } else {
      bool from_scratch = !final;
      g_c = zc;
      g_r = zr;
      if (relu_in) {  // a ReLU's gradient is fresh
        std::tie(g_c, g_r) = relu_backward(g_c, g_r, center, radius);
        from_scratch = false;
      }
      g_c = released(g_c, from_scratch, format);
      g_r = released(g_r, from_scratch, format);
    }
  }
  if (need[2]) {
    const Planes in = input_planes(center, radius, l, relu_in ? PackOp::kReluBox : PackOp::kCopy, PlanesUse::kReuse);
    const Entries en = forward_entries(csr, values, l);
    g_v = at::empty({values.numel()}, values.options());
    const int64_t plane = planes ? l.plane_g() : l.h.out() * l.w.out(), row = planes ? l.cols_g() : l.w.out();
    AT_DISPATCH_FLOATING_TYPES(center.scalar_type(), "robprune_sparse_interval_conv2d_backward", [&] {
      const scalar_t* ga = planes ? gradient_region<scalar_t>(g.a, l) : data<scalar_t>(g.a);
      const scalar_t* gb = planes ? gradient_region<scalar_t>(g.b, l) : data<scalar_t>(g.b);
      forward_dot<scalar_t>(en, l, ga, gb, l.out_channels * plane, plane, row, in, mutable_data<scalar_t>(g_v),
                            need[3] ? mutable_data<scalar_t>(g_bias) : nullptr);
    });
  }
  return {empty_if_unused(need[0] ? g_c : at::Tensor(), center), empty_if_unused(need[1] ? g_r : at::Tensor(), center),
          empty_if_unused(g_v, center), empty_if_unused(g_bias, center)};
}

}  // namespace robprune
