// Operator schemas, defined once and used for both namespaces: `bdlkern` (CPU and CUDA kernels)
// and `bdlkern_simt` (the CUDA sources run by the SIMT emulator, on CPU tensors, for tests).
#pragma once

#include <torch/library.h>

namespace bdlkern {
namespace ops {

inline void define_rng_schemas(torch::Library& m) {
  m.def("philox4x32(Tensor counter, Tensor key) -> Tensor");
  m.def("philox_bits(Tensor rng_state, SymInt[] size, int stream=0) -> Tensor");
  m.def("dropout_mask(Tensor rng_state, SymInt[] size, float p, int stream=0) -> Tensor");
  m.def("uniform(Tensor rng_state, SymInt[] size, int stream=0, ScalarType? dtype=None) -> Tensor");
  m.def("normal(Tensor rng_state, SymInt[] size, int stream=0, ScalarType? dtype=None) -> Tensor");
}

inline void define_mc_dropout_schemas(torch::Library& m) {
  m.def(
      "mc_dropout_linear(Tensor x, Tensor weight, Tensor? bias, Tensor rng_state, float p, "
      "int num_samples, bool shared_mask=False, bool? memory_efficient=None) -> Tensor");
  m.def(
      "mc_dropout_linear_grad_input(Tensor grad_out, Tensor weight, Tensor rng_state, float p, "
      "bool shared_mask, bool sum_samples, bool? memory_efficient=None) -> Tensor");
  m.def(
      "mc_dropout_linear_grad_weight(Tensor grad_out, Tensor x, Tensor rng_state, float p, "
      "bool shared_mask, bool? memory_efficient=None) -> Tensor");
  // x [N, C, *sp] shared by the samples (shared_input) or [S N, C, *sp]; y [S N, C_out, *sp_out]
  // sample-major. The backward returns (grad_x, grad_weight, grad_bias), an empty tensor for
  // each gradient output_mask leaves out.
  m.def(
      "mc_dropout_conv(Tensor x, Tensor weight, Tensor? bias, Tensor rng_state, float p, "
      "int num_samples, bool shared_input, int[] stride, int[] padding, int[] dilation, "
      "int groups, bool channel_mask=False, bool shared_mask=False) -> Tensor");
  m.def(
      "mc_dropout_conv_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor rng_state, "
      "float p, int num_samples, bool shared_input, int[] stride, int[] padding, int[] dilation, "
      "int groups, bool channel_mask, bool shared_mask, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}

inline void define_concrete_schemas(torch::Library& m) {
  m.def(
      "concrete_dropout(Tensor x, Tensor p_logit, Tensor rng_state, float temperature=0.1, "
      "int channel_dim=-1) -> Tensor");
  m.def(
      "concrete_dropout_backward(Tensor grad_out, Tensor x, Tensor p_logit, Tensor rng_state, "
      "float temperature, int channel_dim) -> (Tensor, Tensor)");
}

inline void define_gaussian_schemas(torch::Library& m) {
  m.def(
      "gaussian_dropout(Tensor x, Tensor log_alpha, Tensor rng_state, int channel_dim=-1) "
      "-> Tensor");
  m.def(
      "gaussian_dropout_backward(Tensor grad_out, Tensor x, Tensor log_alpha, Tensor rng_state, "
      "int channel_dim) -> (Tensor, Tensor)");
}

inline void define_sparse_vd_schemas(torch::Library& m) {
  m.def(
      "lrt_linear(Tensor x, Tensor theta, Tensor log_sigma2, Tensor? bias, Tensor rng_state, "
      "int num_samples) -> (Tensor, Tensor)");
  m.def(
      "lrt_linear_backward(Tensor grad_out, Tensor x, Tensor theta, Tensor log_sigma2, Tensor std, "
      "Tensor rng_state) -> (Tensor, Tensor, Tensor, Tensor)");
  // The LRT of a convolution, samples folded into the batch as mc_dropout_conv's: (y, std).
  m.def(
      "lrt_conv(Tensor x, Tensor theta, Tensor log_sigma2, Tensor? bias, Tensor rng_state, "
      "int num_samples, bool shared_input, int[] stride, int[] padding, int[] dilation, "
      "int groups) -> (Tensor, Tensor)");
  m.def(
      "lrt_conv_backward(Tensor grad_out, Tensor x, Tensor theta, Tensor log_sigma2, Tensor std, "
      "Tensor rng_state, int num_samples, bool shared_input, int[] stride, int[] padding, "
      "int[] dilation, int groups) -> (Tensor, Tensor, Tensor, Tensor)");
  // Variance layers (Neklyudov et al. 2018): zero-mean weights N(0, exp(log_sigma2)), the LRT of
  // lrt_linear / lrt_conv without the mean product: y = bias + sqrt(x^2 sigma^2 + 1e-8) eps.
  m.def(
      "variance_linear(Tensor x, Tensor log_sigma2, Tensor? bias, Tensor rng_state, "
      "int num_samples) -> (Tensor, Tensor)");
  m.def(
      "variance_linear_backward(Tensor grad_out, Tensor x, Tensor log_sigma2, Tensor std, "
      "Tensor rng_state) -> (Tensor, Tensor, Tensor)");
  m.def(
      "variance_conv(Tensor x, Tensor log_sigma2, Tensor? bias, Tensor rng_state, "
      "int num_samples, bool shared_input, int[] stride, int[] padding, int[] dilation, "
      "int groups) -> (Tensor, Tensor)");
  m.def(
      "variance_conv_backward(Tensor grad_out, Tensor x, Tensor log_sigma2, Tensor std, "
      "Tensor rng_state, int num_samples, bool shared_input, int[] stride, int[] padding, "
      "int[] dilation, int groups) -> (Tensor, Tensor, Tensor)");
  m.def("sparse_vd_kl(Tensor theta, Tensor log_sigma2) -> Tensor");
  m.def("sparse_vd_kl_backward(Tensor grad, Tensor theta, Tensor log_sigma2) -> (Tensor, Tensor)");
  m.def("sparse_vd_kl_with_grad(Tensor theta, Tensor log_sigma2) -> (Tensor, Tensor, Tensor)");
  // The exact KL under the ARD prior with its optimal variance (Kharitonov et al. 2018).
  m.def("ard_kl(Tensor theta, Tensor log_sigma2) -> Tensor");
  m.def("ard_kl_backward(Tensor grad, Tensor theta, Tensor log_sigma2) -> (Tensor, Tensor)");
  m.def("ard_kl_with_grad(Tensor theta, Tensor log_sigma2) -> (Tensor, Tensor, Tensor)");
  // validate: check the CSR structure (and row_order, and that the variances are >= 0) on the
  // host, which on CUDA copies it and waits. False skips those data checks (the metadata checks
  // stay): for callers that validated the structure once, as SparseLinear / SparseConv do at
  // construction and load, so that a forward never stalls the stream.
  m.def(
      "sparse_linear(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias, "
      "Tensor? row_order, bool validate=True) -> Tensor");
  m.def(
      "sparse_linear_backward(Tensor grad_out, Tensor crow, Tensor col, Tensor values, "
      "int in_features, bool validate=True) -> Tensor");
  m.def(
      "sparse_linear_lrt(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias, "
      "Tensor? row_order, Tensor rng_state, int num_samples, bool validate=True) -> (Tensor, Tensor)");
  m.def(
      "sparse_linear_lrt_backward(Tensor grad_out, Tensor x, Tensor crow, Tensor col, "
      "Tensor values, Tensor std, Tensor rng_state, bool validate=True) -> Tensor");
  // The sparse convolution: CSR over [C_out, C_in / groups * prod(kernel_size)] (bdlkern/sparse_conv).
  m.def(
      "sparse_conv(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias, "
      "int[] kernel_size, int[] stride, int[] padding, int[] dilation, int groups, "
      "bool validate=True) -> Tensor");
  m.def(
      "sparse_conv_backward(Tensor grad_out, Tensor crow, Tensor col, Tensor values, "
      "int[] input_size, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
      "int groups, bool validate=True) -> Tensor");
  m.def(
      "sparse_conv_lrt(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias, "
      "Tensor rng_state, int num_samples, bool shared_input, int[] kernel_size, int[] stride, "
      "int[] padding, int[] dilation, int groups, bool validate=True) -> (Tensor, Tensor)");
  m.def(
      "sparse_conv_lrt_backward(Tensor grad_out, Tensor x, Tensor crow, Tensor col, "
      "Tensor values, Tensor std, Tensor rng_state, int num_samples, bool shared_input, "
      "int[] kernel_size, int[] stride, int[] padding, int[] dilation, int groups, "
      "bool validate=True) -> Tensor");
}

}  // namespace ops
}  // namespace bdlkern
