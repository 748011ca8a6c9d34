// The cost model that picks the CUDA path of mc_dropout_linear (torch-free, host-only).
//
// Two paths compute the same op on a GPU (bdlkern/mc_dropout/kernels.h):
//   fused        the tiled kernel of csrc/kernels/cuda/mc_dropout_linear.cu: no S x copy of the
//                input; the Philox mask is re-made for every N tile of 64 columns (forward,
//                grad_weight) or once per output (grad_input);
//   materialise  one memory-bound mask pass writes the masked input (or applies the mask to the
//                GEMM's output, grad_input), and cuBLAS (at::mm / addmm) does the product;
//                it holds an S x B x K workspace.
// The model estimates each path's time as a sum of kernels, each the slower of its arithmetic and
// its DRAM traffic plus a launch cost, from the device's SM count, clock and memory interface
// (cudaDevAttr* values) and per-architecture peak rates (arch_peaks). It also estimates eager
// PyTorch (F.dropout on x.expand(S, B, K), which writes the output and a bool mask, then the same
// GEMM) so that the README's estimates compare like with like. By construction the materialise
// path's forward and grad_input cost eager's GEMM plus one pass that moves fewer bytes than
// eager's dropout pass; its grad_weight re-makes the masked input (one pass) where eager reads
// the dropout output it saved (S x B x K memory held from forward to backward).
//
// The efficiencies below are assumptions, not measurements (no GPU has run this code yet; see the
// README's "GPU status"). They are kept in one place so a measurement can correct them.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>

#include <bdlkern/common/dtype.h>

namespace bdlkern {

// What the model reads of a device: cudaDevAttrComputeCapabilityMajor/Minor,
// cudaDevAttrMultiProcessorCount, cudaDevAttrClockRate (kHz), cudaDevAttrMemoryClockRate (kHz),
// cudaDevAttrGlobalMemoryBusWidth (bits) and the total memory (bytes).
struct GpuSpec {
  int major = 0, minor = 0;
  int sm_count = 0;
  double sm_clock_khz = 0;   // maximum SM clock
  double mem_clock_khz = 0;  // memory clock; DRAM moves 2 transfers per clock (DDR / HBM)
  int mem_bus_bits = 0;
  double total_memory = 0;   // bytes
};

// Two devices as cudaDeviceGetAttribute reports them (deviceQuery), for tests and the README's
// estimates; the SIMT emulator's auto choice also uses the H100.
inline GpuSpec a100_sxm4_80gb() {
  GpuSpec g;
  g.major = 8, g.minor = 0, g.sm_count = 108;
  g.sm_clock_khz = 1410000, g.mem_clock_khz = 1593000, g.mem_bus_bits = 5120;
  g.total_memory = 80.0 * (1ull << 30);
  return g;
}
inline GpuSpec h100_sxm5_80gb() {
  GpuSpec g;
  g.major = 9, g.minor = 0, g.sm_count = 132;
  g.sm_clock_khz = 1980000, g.mem_clock_khz = 2619000, g.mem_bus_bits = 5120;
  g.total_memory = 80.0 * (1ull << 30);
  return g;
}

// Peak issue rates per SM per clock, dense, of one architecture (NVIDIA's whitepapers).
struct ArchPeaks {
  double mma_16bit;  // FLOP/clk/SM: tensor-core fp16/bf16 with fp32 accumulation
  double mma_tf32;   // FLOP/clk/SM: tensor-core tf32 (0: none)
  double mma_fp64;   // FLOP/clk/SM: tensor-core fp64 (0: none)
  double fma_fp32;   // FLOP/clk/SM: CUDA-core fp32 (2 per FMA)
  double fma_fp64;   // FLOP/clk/SM: CUDA-core fp64
  double int32;      // integer instructions/clk/SM (the Philox rounds)
  bool modern_mma;   // wgmma/tcgen05 exist: cuBLAS reaches its peak, a WMMA (mma.sync) kernel
                     // does not
};

inline ArchPeaks arch_peaks(int major, int minor) {
  // Unknown architectures take the nearest older one.
  if (major >= 10) return {8192, 4096, 128, 256, 128, 64, true};      // B200
  if (major == 9) return {4096, 2048, 128, 256, 128, 64, true};       // H100
  if (major == 8 && minor == 0) return {2048, 1024, 128, 128, 64, 64, false};  // A100
  if (major == 8) return {512, 256, 0, 256, 4, 128, false};           // GA10x, AD10x (fp32 acc)
  if (major == 7 && minor >= 5) return {512, 0, 0, 128, 4, 64, false};  // T4
  return {1024, 0, 0, 128, 64, 64, false};                            // V100 and older
}

// Assumed fractions of peak (the documented model constants).
struct CostAssumptions {
  static constexpr double kCublas = 0.70;        // cuBLAS on a large GEMM
  static constexpr double kBandwidth = 0.80;     // a streaming elementwise pass
  static constexpr double kFusedWmma = 0.30;     // our WMMA core, sm_70 .. sm_89
  static constexpr double kFusedWmmaModern = 0.15;  // our WMMA core where wgmma sets the peak:
                                                    // 2 blocks of 4 warps per SM (12.5 %
                                                    // occupancy at 123-180 registers)
  static constexpr double kFusedFma = 0.50;      // our 64 x 64 FMA core (float32 / float64)
  static constexpr double kLaunch = 4e-6;        // seconds per kernel launch
  static constexpr double kPhiloxInstr = 128;    // integer instructions per Philox4x32-10 block
  static constexpr double kWorkspaceShare = 0.125;  // auto never asks for more than this share
                                                    // of the device's memory as workspace
};

enum class McDropoutPass : int { kForward = 0, kGradInput = 1, kGradWeight = 2 };

struct McDropoutProblem {
  int64_t S = 1, B = 0, K = 0, N = 0;
  bool shared_input = true;  // x is [B, K] for every sample
  DType dtype = DType::kFloat32;
  bool allow_tf32 = false;   // torch.backends.cuda.matmul.allow_tf32 (float32 only)
  McDropoutPass pass = McDropoutPass::kForward;
  bool shared_mask = false;  // one mask per (sample, feature)
  double keep = 0.5;         // 1 - p
};

struct PathCost {
  double seconds = 0;
  double flops = 0;
  double bytes = 0;      // DRAM traffic
  double workspace = 0;  // bytes held beyond inputs and outputs
};

struct McDropoutPlan {
  PathCost fused, materialise, eager;
  bool memory_efficient = true;  // the path auto picks: true = fused
};

namespace cost_detail {

inline double element_bytes(DType t) {
  switch (t) {
    case DType::kFloat64:
      return 8;
    case DType::kFloat32:
      return 4;
    default:
      return 2;
  }
}

inline double bandwidth(const GpuSpec& g) {  // bytes / s
  return 2.0 * g.mem_clock_khz * 1e3 * g.mem_bus_bits / 8.0;
}

inline double per_second(const GpuSpec& g, double per_clk_sm) {
  return per_clk_sm * g.sm_count * g.sm_clock_khz * 1e3;
}

// Peak FLOP/s of cuBLAS for the dtype (tensor cores where the dtype and the TF32 flag allow).
inline double cublas_peak(const GpuSpec& g, const ArchPeaks& a, DType t, bool tf32) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return per_second(g, a.mma_16bit);
    case DType::kFloat64:
      return per_second(g, std::max(a.mma_fp64, a.fma_fp64));
    case DType::kFloat32:
      return per_second(g, tf32 && a.mma_tf32 > 0 ? a.mma_tf32 : a.fma_fp32);
  }
  return per_second(g, a.fma_fp32);
}

// Peak FLOP/s of the fused kernel times its assumed efficiency: WMMA for 16-bit types (mma.sync),
// FMA for float32 (never TF32: its rounding would be the stricter flag's) and float64.
inline double fused_rate(const GpuSpec& g, const ArchPeaks& a, DType t) {
  if (t == DType::kFloat16 || t == DType::kBFloat16) {
    return per_second(g, a.mma_16bit) *
           (a.modern_mma ? CostAssumptions::kFusedWmmaModern : CostAssumptions::kFusedWmma);
  }
  return per_second(g, t == DType::kFloat64 ? a.fma_fp64 : a.fma_fp32) *
         CostAssumptions::kFusedFma;
}

// Blocks of `tile` x `tile` outputs over `resident` slots per SM: the share of the machine the
// last wave leaves idle stretches the time.
inline double wave_factor(const GpuSpec& g, double rows, double cols, double tile, int resident) {
  const double blocks = std::ceil(rows / tile) * std::ceil(cols / tile);
  const double slots = static_cast<double>(g.sm_count) * resident;
  if (blocks <= 0) return 1.0;
  return std::ceil(blocks / slots) * slots / blocks;
}

// One kernel: the slower of its arithmetic and its traffic, plus a launch.
inline double kernel_time(double flop_seconds, double bytes, const GpuSpec& g) {
  return std::max(flop_seconds, bytes / (bandwidth(g) * CostAssumptions::kBandwidth)) +
         CostAssumptions::kLaunch;
}

inline double philox_seconds(const GpuSpec& g, const ArchPeaks& a, double elements) {
  return elements / 4.0 * CostAssumptions::kPhiloxInstr / per_second(g, a.int32);
}

}  // namespace cost_detail

// The estimates of one pass (forward, grad_input or grad_weight) of mc_dropout_linear, and the
// path auto takes: the faster one, unless the materialised workspace would exceed
// kWorkspaceShare of the device's memory.
inline McDropoutPlan plan_mc_dropout_linear(const GpuSpec& g, const McDropoutProblem& pr) {
  using namespace cost_detail;
  const ArchPeaks a = arch_peaks(g.major, g.minor);
  const double e = element_bytes(pr.dtype);
  const double S = static_cast<double>(pr.S), B = static_cast<double>(pr.B),
               K = static_cast<double>(pr.K), N = static_cast<double>(pr.N);
  const double R = S * B;                 // GEMM rows over all samples
  const double xin = pr.shared_input ? B * K : R * K;  // input elements read
  const double flops = 2.0 * R * K * N;
  const double gemm_bytes = (R * K + N * K + R * N) * e;
  const double n_tiles = std::ceil(N / 64.0);
  const int resident = 2;  // blocks per SM of the fused kernel (registers bound both cores)

  // The GEMM's output: [R, N] (forward), [R, K] (grad_input), [N, K] (grad_weight).
  const double out_rows = pr.pass == McDropoutPass::kGradWeight ? N : R;
  const double out_cols = pr.pass == McDropoutPass::kForward ? N : K;

  McDropoutPlan plan;
  // cuBLAS GEMM of the same size (both the materialise path and eager use it), 128 x 128 tiles.
  const double gemm = kernel_time(
      flops / (cublas_peak(g, a, pr.dtype, pr.allow_tf32) * CostAssumptions::kCublas) *
          wave_factor(g, out_rows, out_cols, 128, 1),
      gemm_bytes, g);
  // Our mask pass over R x K elements: read the input (or the GEMM output), write the result.
  // Forward / grad_weight read x and write R x K; grad_input reads R x K and writes x's shape.
  const double mask_pass_bytes = (R * K + xin) * e;
  const double mask_pass =
      kernel_time(philox_seconds(g, a, R * K), mask_pass_bytes, g);
  // Eager: F.dropout reads the expanded input and writes the output and a bool mask; backward
  // reads the gradient and the mask and writes the masked gradient (summed over the samples for a
  // shared x). Its grad_weight multiplies the dropout output it saved: the GEMM alone.
  double eager_pass = 0, eager_pass_bytes = 0;
  if (pr.pass == McDropoutPass::kForward) {
    eager_pass_bytes = R * K * (2 * e + 1);
    eager_pass = kernel_time(philox_seconds(g, a, R * K), eager_pass_bytes, g);
  } else if (pr.pass == McDropoutPass::kGradInput) {
    eager_pass_bytes = R * K * (2 * e + 1);
    eager_pass = kernel_time(0, eager_pass_bytes, g);
    if (pr.shared_input) {
      eager_pass_bytes += (R * K + B * K) * e;
      eager_pass += kernel_time(0, (R * K + B * K) * e, g);
    }
  }
  plan.materialise.flops = plan.eager.flops = flops;
  plan.materialise.seconds = gemm + mask_pass;
  plan.materialise.bytes = gemm_bytes + mask_pass_bytes;
  // grad_input writes the GEMM output into grad_x itself unless the samples are summed.
  plan.materialise.workspace =
      (pr.pass == McDropoutPass::kGradInput && !pr.shared_input) ? 0 : R * K * e;
  plan.eager.seconds = gemm + eager_pass;
  plan.eager.bytes = gemm_bytes + eager_pass_bytes;
  plan.eager.workspace = R * K * (e + 1);  // the dropout output and mask it saves for backward

  // Fused: the GEMM at the kernel's own rate, and the Philox words it re-makes.
  // grad_input makes each mask word once (its epilogue); the other two once per 64-wide N tile.
  double philox_elems = pr.pass == McDropoutPass::kGradInput ? R * K : R * K * n_tiles;
  double fused_flops = flops, fused_launches = 0;
  if (pr.pass == McDropoutPass::kForward && pr.shared_mask && pr.keep < 1.0) {
    // Shared masks in forward: one kernel lists each sample's kept features (S K mask words),
    // then the GEMM gathers those columns only (assumed to load as fast as the vector path).
    philox_elems = S * K;
    fused_flops = flops * pr.keep;
    fused_launches = 1;
  }
  // grad_input with a shared x loops over the samples inside a block of the [B, K] output; the
  // shared-mask forward tiles each sample's B rows apart.
  double fused_rows = (pr.pass == McDropoutPass::kGradInput && pr.shared_input) ? B : out_rows;
  if (fused_launches > 0) fused_rows = S * std::ceil(B / 64.0) * 64.0;
  const double fused_math =
      fused_flops / fused_rate(g, a, pr.dtype) * wave_factor(g, fused_rows, out_cols, 64, resident);
  plan.fused.flops = fused_flops;
  plan.fused.bytes = (xin + N * K + R * N) * e;
  // A roofline over three pipes: the kernel takes as long as the busiest of its math, its DRAM
  // traffic and its integer Philox work (at the README shape on an H100 that is the Philox).
  plan.fused.seconds =
      kernel_time(std::max(fused_math, philox_seconds(g, a, philox_elems)), plan.fused.bytes, g) +
      fused_launches * CostAssumptions::kLaunch;
  plan.fused.workspace = fused_launches > 0 ? S * (K + 1) * 4.0 : 0.0;  // the kept lists

  const bool fits = plan.materialise.workspace <= CostAssumptions::kWorkspaceShare * g.total_memory;
  plan.memory_efficient = !(fits && plan.materialise.seconds < plan.fused.seconds);
  return plan;
}

}  // namespace bdlkern
