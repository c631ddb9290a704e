// The binding layer: operator schemas (TORCH_LIBRARY), their CPU and CUDA registrations, and
// the Python module robprune_fast._C, whose import loads them into torch.ops.robprune_fast.
// Autograd formulas and fake (meta) kernels are registered from Python, in the op families'
// modules of python/robprune_fast/ops/.
#include "../csrc/crown/crown_ops.h"
#include "../csrc/interval/interval_ops.h"
#include "../csrc/sparse/sparse_ops.h"

#include <torch/library.h>
#include <torch/headeronly/version.h>
#include <pybind11/pybind11.h>

#include <string>

// The build passes the CUDA architectures as one token, e.g. sm80_sm90 (a quoted string
// would not survive the shell quoting of every build tool).
#define ROBPRUNE_STR_(x) #x
#define ROBPRUNE_STR(x) ROBPRUNE_STR_(x)
#ifndef ROBPRUNE_CUDA_ARCHS
#define ROBPRUNE_CUDA_ARCHS none
#endif

TORCH_LIBRARY(robprune_fast, m) {
  m.def("masked_weight_pair(Tensor weight, Tensor? mask) -> Tensor");
  m.def("input_box(Tensor x, Tensor eps, Tensor? scale, Tensor? shift) -> (Tensor, Tensor)");
  m.def("relu_box_(Tensor(a!) center, Tensor(b!) radius, bool check_radius=True) -> ()");
  m.def(
      "interval_linear(Tensor center, Tensor radius, Tensor weight, Tensor? bias, Tensor? mask, "
      "Tensor? weight_pair, bool relu_in, bool out_bounds, bool check_radius=True) -> (Tensor, Tensor)");
  m.def(
      "interval_linear_backward(Tensor grad_a, Tensor grad_b, Tensor center, Tensor radius, "
      "Tensor weight, Tensor? mask, Tensor? weight_pair, bool relu_in, bool out_bounds, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "interval_conv2d(Tensor center, Tensor radius, Tensor weight, Tensor? bias, Tensor? mask, "
      "Tensor? weight_pair, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool relu_in, bool out_bounds, bool check_radius=True) -> (Tensor, Tensor)");
  m.def(
      "interval_conv2d_backward(Tensor grad_a, Tensor grad_b, Tensor center, Tensor radius, "
      "Tensor weight, Tensor? mask, Tensor? weight_pair, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool relu_in, bool out_bounds, bool[5] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("crown_relu_backward(Tensor A, Tensor lower, Tensor upper, bool upper_side) -> (Tensor, Tensor)");
  m.def(
      "crown_relu_backward_grad(Tensor grad_A_out, Tensor grad_bias, Tensor A, Tensor lower, "
      "Tensor upper, bool upper_side) -> (Tensor, Tensor, Tensor)");
  m.def(
      "crown_linear_backward(Tensor A, Tensor weight, Tensor? bias, Tensor? mask, "
      "Tensor? weight_pair) -> (Tensor, Tensor)");
  m.def(
      "crown_linear_backward_grad(Tensor grad_A_out, Tensor grad_bias_term, Tensor A, "
      "Tensor weight, Tensor? bias, Tensor? mask, Tensor? weight_pair, bool[4] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "crown_conv2d_backward(Tensor A, Tensor weight, Tensor? bias, Tensor? mask, "
      "Tensor? weight_pair, int[2] input_size, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups) -> (Tensor, Tensor)");
  m.def(
      "crown_conv2d_backward_grad(Tensor grad_A_out, Tensor grad_bias_term, Tensor A, "
      "Tensor weight, Tensor? bias, Tensor? mask, Tensor? weight_pair, int[2] input_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool[4] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "masked_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? mask, Tensor? weight_pair) "
      "-> Tensor");
  m.def(
      "masked_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor? mask, "
      "Tensor? weight_pair, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "masked_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? mask, Tensor? weight_pair, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "masked_conv2d_backward(Tensor grad, Tensor x, Tensor weight, Tensor? mask, "
      "Tensor? weight_pair, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // The compressed path: the weight as its kept values and their indices (csrc/sparse/sparse_index.h).
  m.def(
      "sparse_linear(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor col, int out_features) "
      "-> Tensor");
  m.def(
      "sparse_linear_t(Tensor g, Tensor values, Tensor col_ptr, Tensor row, Tensor csc_to_csr, "
      "int in_features) -> Tensor");
  m.def(
      "sparse_linear_values_grad(Tensor g, Tensor x, Tensor col_ptr, Tensor row, Tensor csc_to_csr) -> Tensor");
  m.def(
      "sparse_linear_backward(Tensor grad, Tensor x, Tensor values, Tensor col_ptr, Tensor row, "
      "Tensor csc_to_csr, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "sparse_conv2d(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor col, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "sparse_conv2d_t(Tensor g, Tensor values, Tensor col_ptr, Tensor row, Tensor csc_to_csr, "
      "int[2] input_size, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) "
      "-> Tensor");
  m.def(
      "sparse_conv2d_values_grad(Tensor g, Tensor x, Tensor row_ptr, Tensor col, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "sparse_interval_linear(Tensor center, Tensor radius, Tensor values, Tensor? bias, Tensor row_ptr, "
      "Tensor col, int out_features, bool relu_in, bool out_bounds, bool check_radius=True) -> (Tensor, Tensor)");
  m.def(
      "sparse_interval_linear_backward(Tensor grad_a, Tensor grad_b, Tensor center, Tensor radius, "
      "Tensor values, Tensor row_ptr, Tensor col, Tensor col_ptr, Tensor row, Tensor csc_to_csr, "
      "bool relu_in, bool out_bounds, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sparse_interval_conv2d(Tensor center, Tensor radius, Tensor values, Tensor? bias, Tensor row_ptr, "
      "Tensor col, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "bool relu_in, bool out_bounds, bool check_radius=True) -> (Tensor, Tensor)");
  m.def(
      "sparse_interval_conv2d_backward(Tensor grad_a, Tensor grad_b, Tensor center, Tensor radius, "
      "Tensor values, Tensor row_ptr, Tensor col, Tensor col_ptr, Tensor row, Tensor csc_to_csr, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu_in, "
      "bool out_bounds, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

// One implementation per op serves both devices: it picks the CPU or CUDA kernels of its family
// from the input's device (csrc/<family>/<family>_ops.cpp), so both registrations are these
// lists.
static void register_interval_ops(torch::Library& m) {
  m.impl("masked_weight_pair", &robprune::masked_weight_pair);
  m.impl("input_box", &robprune::input_box);
  m.impl("relu_box_", &robprune::relu_box_);
  m.impl("interval_linear", &robprune::interval_linear);
  m.impl("interval_linear_backward", &robprune::interval_linear_backward);
  m.impl("interval_conv2d", &robprune::interval_conv2d);
  m.impl("interval_conv2d_backward", &robprune::interval_conv2d_backward);
}

static void register_crown_ops(torch::Library& m) {
  m.impl("crown_relu_backward", &robprune::crown_relu_backward);
  m.impl("crown_relu_backward_grad", &robprune::crown_relu_backward_grad);
  m.impl("crown_linear_backward", &robprune::crown_linear_backward);
  m.impl("crown_linear_backward_grad", &robprune::crown_linear_backward_grad);
  m.impl("crown_conv2d_backward", &robprune::crown_conv2d_backward);
  m.impl("crown_conv2d_backward_grad", &robprune::crown_conv2d_backward_grad);
}

static void register_sparse_ops(torch::Library& m) {
  m.impl("masked_linear", &robprune::masked_linear);
  m.impl("masked_linear_backward", &robprune::masked_linear_backward);
  m.impl("masked_conv2d", &robprune::masked_conv2d);
  m.impl("masked_conv2d_backward", &robprune::masked_conv2d_backward);
}

// The compressed path: CPU kernels (SIMD, or the generic ones under ROBPRUNE_SIMD=generic) and,
// in a CUDA build, the generic kernels on the GPU (csrc/sparse/sparse_generic.h).
static void register_compressed_ops(torch::Library& m) {
  m.impl("sparse_linear", &robprune::sparse_linear);
  m.impl("sparse_linear_t", &robprune::sparse_linear_t);
  m.impl("sparse_linear_values_grad", &robprune::sparse_linear_values_grad);
  m.impl("sparse_linear_backward", &robprune::sparse_linear_backward);
  m.impl("sparse_conv2d", &robprune::sparse_conv2d);
  m.impl("sparse_conv2d_t", &robprune::sparse_conv2d_t);
  m.impl("sparse_conv2d_values_grad", &robprune::sparse_conv2d_values_grad);
  m.impl("sparse_interval_linear", &robprune::sparse_interval_linear);
  m.impl("sparse_interval_linear_backward", &robprune::sparse_interval_linear_backward);
  m.impl("sparse_interval_conv2d", &robprune::sparse_interval_conv2d);
  m.impl("sparse_interval_conv2d_backward", &robprune::sparse_interval_conv2d_backward);
}

static void register_ops(torch::Library& m) {
  register_interval_ops(m);
  register_crown_ops(m);
  register_sparse_ops(m);
  register_compressed_ops(m);
}

TORCH_LIBRARY_IMPL(robprune_fast, CPU, m) { register_ops(m); }

#ifdef ROBPRUNE_WITH_CUDA
TORCH_LIBRARY_IMPL(robprune_fast, CUDA, m) { register_ops(m); }
#endif

PYBIND11_MODULE(_C, module) {
  module.doc() = "robprune_fast's compiled operators (registered in torch.ops.robprune_fast)";
  module.def("build_info", [] {
    pybind11::dict info;
#ifdef ROBPRUNE_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = std::string(ROBPRUNE_STR(ROBPRUNE_CUDA_ARCHS));
    info["torch_version"] = std::string(TORCH_VERSION);
    return info;
  }, "What this build of the extension compiled: CUDA kernels or not, archs, torch version.");
  module.def("_recorded_weight_pairs", &robprune::recorded_weight_pairs,
             "How many weight pairs the registry of masked_weight_pair holds (for tests).");
}
