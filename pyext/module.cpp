// The binding layer: operator schemas (TORCH_LIBRARY), their CPU and CUDA registrations, and
// the Python module robprune_fast._C, whose import loads them into torch.ops.robprune_fast.
// Autograd formulas and fake (meta) kernels are registered from Python, in the op families'
// modules of python/robprune_fast/ops/.
#include "../csrc/crown/crown_ops.h"
#include "../csrc/interval/interval_ops.h"
#include "../csrc/sparse/sparse_ops.h"

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
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
  m.def("sparse_gather(Tensor weight, Tensor row_ptr, Tensor col) -> Tensor");
  m.def("sparse_scatter_(Tensor(a!) out, Tensor values, Tensor row_ptr, Tensor col) -> ()");
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
// from the input's device (csrc/<family>/<family>_ops.cpp), so both registrations are this list.
// Every op is registered under its function's name, which the macro writes once for both.
#define ROBPRUNE_IMPL(op) m.impl(#op, &robprune::op)
static void register_ops(torch::Library& m) {
  // The interval family.
  ROBPRUNE_IMPL(masked_weight_pair);
  ROBPRUNE_IMPL(input_box);
  ROBPRUNE_IMPL(relu_box_);
  ROBPRUNE_IMPL(interval_linear);
  ROBPRUNE_IMPL(interval_linear_backward);
  ROBPRUNE_IMPL(interval_conv2d);
  ROBPRUNE_IMPL(interval_conv2d_backward);
  // CROWN's backward steps.
  ROBPRUNE_IMPL(crown_relu_backward);
  ROBPRUNE_IMPL(crown_relu_backward_grad);
  ROBPRUNE_IMPL(crown_linear_backward);
  ROBPRUNE_IMPL(crown_linear_backward_grad);
  ROBPRUNE_IMPL(crown_conv2d_backward);
  ROBPRUNE_IMPL(crown_conv2d_backward_grad);
  // The sparse family's dense path.
  ROBPRUNE_IMPL(masked_linear);
  ROBPRUNE_IMPL(masked_linear_backward);
  ROBPRUNE_IMPL(masked_conv2d);
  ROBPRUNE_IMPL(masked_conv2d_backward);
  // The compressed path: CPU kernels (SIMD, or the generic ones under ROBPRUNE_SIMD=generic) and,
  // in a CUDA build, the generic kernels on the GPU (csrc/sparse/sparse_generic.h).
  ROBPRUNE_IMPL(sparse_linear);
  ROBPRUNE_IMPL(sparse_linear_t);
  ROBPRUNE_IMPL(sparse_linear_values_grad);
  ROBPRUNE_IMPL(sparse_linear_backward);
  ROBPRUNE_IMPL(sparse_conv2d);
  ROBPRUNE_IMPL(sparse_conv2d_t);
  ROBPRUNE_IMPL(sparse_conv2d_values_grad);
  ROBPRUNE_IMPL(sparse_gather);
  ROBPRUNE_IMPL(sparse_scatter_);
  ROBPRUNE_IMPL(sparse_interval_linear);
  ROBPRUNE_IMPL(sparse_interval_linear_backward);
  ROBPRUNE_IMPL(sparse_interval_conv2d);
  ROBPRUNE_IMPL(sparse_interval_conv2d_backward);
}
#undef ROBPRUNE_IMPL

TORCH_LIBRARY_IMPL(robprune_fast, CPU, m) { register_ops(m); }

#ifdef ROBPRUNE_WITH_CUDA
TORCH_LIBRARY_IMPL(robprune_fast, CUDA, m) { register_ops(m); }
#endif

// The ops that compute gradients have no derivative of their own. Without an autograd kernel
// torch lets a second backward (create_graph) run through them as if they were constants, with
// a deprecation warning: a silently wrong second derivative (a gradient penalty's, a
// Hessian-vector product's). Their autograd kernel is torch's strict fallback instead, whose
// backward raises "derivative for robprune_fast::<op> is not implemented".
TORCH_LIBRARY_IMPL(robprune_fast, Autograd, m) {
  for (const char* op : {"interval_linear_backward", "interval_conv2d_backward", "crown_relu_backward_grad",
                         "crown_linear_backward_grad", "crown_conv2d_backward_grad", "masked_linear_backward",
                         "masked_conv2d_backward", "sparse_linear_values_grad", "sparse_linear_backward",
                         "sparse_conv2d_values_grad", "sparse_interval_linear_backward",
                         "sparse_interval_conv2d_backward"})
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

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
