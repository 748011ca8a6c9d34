// Raw-pointer entry points of the sparse (CSR) convolution kernels (torch-free).
//
// A pruned convolution weight W [C_out, C_in / groups, kd, kh, kw] is held in CSR over
// [C_out, (C_in / groups) kd kh kw]: row o (an output channel) has entries j in
// [crow[o], crow[o + 1]) at columns col[j] = ((c kd + a) kh + b) kw + e (ascending), with
// values[j * value_stride + value_offset] (theta at offset 0; the weight variance alpha theta^2 at
// offset 1 of interleaved [nnz, 2] values). Every convolution is seen as 3-d: a 1-d one has
// kd = kh = 1 and unit depth and height, a 2-d one kd = 1 and unit depth. No im2col:
//
//   forward:     y[n, o, p] = sum_j w_j * in(x[n, g(o) C_in/groups + c_j, p * stride - pad + k_j * dil])
//                (+ bias[o]),   in(v) = v, or v^2 with square_input (the LRT variance)
//   grad_input:  grad_x[n, c, q] = sum over (o, j) and output positions p that read q of
//                w_j * grad_y[n, o, p]
//
// Each output plane (n, o) is accumulated over its row's entries: per kept weight, w times a
// shifted input plane is added into the output plane, row by row, vectorised along the output
// row. grad_input adds w times the output-gradient plane into the shifted input-gradient plane
// (CPU: images in parallel, channels and entries in order; CUDA: one thread per input element,
// gathering over the entries of its channel). Float32 or float64; deterministic.
#pragma once

#include <stdint.h>

#include <bdlkern/common/backend.h>
#include <bdlkern/common/dtype.h>
#include <bdlkern/common/macros.h>

namespace bdlkern {

struct SparseConvParams {
  int64_t batch;          // images
  int64_t in_channels;    // C_in
  int64_t out_channels;   // C_out: CSR rows
  int64_t groups;
  int64_t in_size[3];     // input depth, height, width (1 for the missing dimensions)
  int64_t out_size[3];
  int64_t kernel[3];
  int64_t stride[3];
  int64_t padding[3];
  int64_t dilation[3];
  const int64_t* crow;    // [C_out + 1]
  const int64_t* col;     // [nnz]
  const void* values;     // [nnz * value_stride]
  int64_t value_stride;   // 1 or 2
  int64_t value_offset;   // 0 (theta) or 1 (alpha theta^2)
  bool square_input;      // forward convolves x^2
  const void* bias;       // [C_out] or nullptr (forward only)
  DType dtype;            // float32 or float64
  void* stream;           // cudaStream_t (CudaTag only)
};

#define BDLKERN_DECLARE_SPARSE_CONV_KERNELS(Tag)                                                  \
  /* y [batch, C_out, out_size] from x [batch, C_in, in_size] */                                 \
  void sparse_conv_forward(Tag, const SparseConvParams& p, const void* x, void* y);              \
  /* grad_x [batch, C_in, in_size] from grad_y [batch, C_out, out_size] (overwritten) */         \
  void sparse_conv_grad_input(Tag, const SparseConvParams& p, const void* grad_y, void* grad_x);

BDLKERN_DECLARE_SPARSE_CONV_KERNELS(CpuTag)
BDLKERN_DECLARE_SPARSE_CONV_KERNELS(CudaTag)
BDLKERN_DECLARE_SPARSE_CONV_KERNELS(SimtTag)

#undef BDLKERN_DECLARE_SPARSE_CONV_KERNELS

// The channel (within its group) and the kernel offsets along depth, height and width of CSR
// column j.
struct SparseConvTap {
  int64_t channel, a, b, e;
};

BDL_HDI SparseConvTap sparse_conv_tap(const SparseConvParams& p, int64_t j) {
  SparseConvTap t;
  t.e = j % p.kernel[2];
  j /= p.kernel[2];
  t.b = j % p.kernel[1];
  j /= p.kernel[1];
  t.a = j % p.kernel[0];
  t.channel = j / p.kernel[0];
  return t;
}

// The output positions [lo, hi) along one dimension whose input position
// o * stride - pad + k * dil lies in [0, in): k is the kernel offset.
BDL_HDI void sparse_conv_range(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad,
                               int64_t dil, int64_t* lo, int64_t* hi) {
  const int64_t shift = pad - k * dil;  // input = o * stride - shift
  // o * stride >= shift  and  o * stride <= in - 1 + shift
  int64_t first = shift <= 0 ? 0 : (shift + stride - 1) / stride;
  int64_t last = in - 1 + shift < 0 ? -1 : (in - 1 + shift) / stride;  // inclusive
  if (last > out - 1) last = out - 1;
  *lo = first;
  *hi = last + 1 > first ? last + 1 : first;
}

}  // namespace bdlkern
