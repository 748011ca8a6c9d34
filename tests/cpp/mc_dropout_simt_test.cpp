// Torch-free check of csrc/kernels/cuda/mc_dropout_linear.cu run under the SIMT emulator: the three entry
// points against a naive float64 reference that rebuilds the mask with MCDropoutMask::keep.
//
// Build and run from the repository root (add --quick for a smaller sweep, or a dtype name):
//   g++ -std=c++20 -O1 -pthread -Icsrc/include -I/usr/local/cuda-13.0/include
//       tests/cpp/mc_dropout_simt_test.cpp -o /tmp/mc_dropout_simt_test
//   /tmp/mc_dropout_simt_test
//
// Checks, for S in {1,3}, B in {0,1,5,37}, K in {1,7,16,70}, N in {1,9,33,64}, shared input and
// shared mask both ways, p in {0, 0.3, 0.9} and all four dtypes:
//   * every output element within tol * sum|terms| of the reference (a bound that does not
//     depend on cancellation; tol 1e-12 float64, 1e-5 float32, 2e-3 float16, 1e-2 bfloat16, all
//     above the output rounding of the dtype; plus 2^-24 for float16 outputs, its subnormal
//     spacing; an all-zero sum must be exactly 0); outputs are pre-filled with NaN so an element
//     the kernel forgets to write fails, and guard elements past the end must stay untouched;
//   * B == 0: grad_weight all zeros, forward / grad_input write nothing;
//   * the exact mask: W = I, bias 0, X = ones, p = 0.5 -> Y / scale equals the mask bit for bit;
//   * a few cases with every pointer offset by one element (the scalar, unaligned load path).
// Exits non-zero on any failure.
#include <bdlkern/common/simt.h>

#include "../../csrc/kernels/cuda/mc_dropout_linear.cu"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using bdlkern::DType;
using bdlkern::MCDropoutLinearParams;
using bdlkern::MCDropoutMask;
using bdlkern::SimtTag;

int g_failed = 0;
int g_cases = 0;
double g_worst = 0.0;  // largest (|err| - atol) / sum|terms| in the current sweep

template <typename T>
struct Host;
template <>
struct Host<float> {
  static constexpr DType kType = DType::kFloat32;
  static constexpr double kTol = 1e-5;
  static constexpr const char* kName = "float32";
  static constexpr double kAtol = 0.0;
  static float from(double v) { return static_cast<float>(v); }
  static double to(float v) { return v; }
};
template <>
struct Host<double> {
  static constexpr DType kType = DType::kFloat64;
  static constexpr double kTol = 1e-12;
  static constexpr const char* kName = "float64";
  static constexpr double kAtol = 0.0;
  static double from(double v) { return v; }
  static double to(double v) { return v; }
};
template <>
struct Host<__half> {
  static constexpr DType kType = DType::kFloat16;
  static constexpr double kTol = 2e-3;
  static constexpr const char* kName = "float16";
  // Outputs below 2^-14 are subnormal, spaced 2^-24: rounding there is absolute.
  static constexpr double kAtol = 0x1p-24;
  static __half from(double v) { return __float2half_rn(static_cast<float>(v)); }
  static double to(__half v) { return __half2float(v); }
};
template <>
struct Host<__nv_bfloat16> {
  static constexpr DType kType = DType::kBFloat16;
  static constexpr double kTol = 1e-2;
  static constexpr const char* kName = "bfloat16";
  static constexpr double kAtol = 0.0;
  static __nv_bfloat16 from(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }
  static double to(__nv_bfloat16 v) { return __bfloat162float(v); }
};

constexpr int kGuard = 8;  // sentinel elements after every output

// A device buffer (host memory under the emulator) with an optional one-element misalignment
// and guard elements after the end.
template <typename T>
struct Buf {
  std::vector<T> storage;
  int shift;
  size_t n;
  Buf(size_t n_, bool misalign) : storage(n_ + kGuard + 1), shift(misalign ? 1 : 0), n(n_) {}
  T* data() { return storage.data() + shift; }
  T& operator[](size_t i) { return data()[i]; }
  void fill_nan() {
    for (auto& v : storage) v = Host<T>::from(NAN);
  }
  bool guard_intact() const {
    for (size_t i = n + shift; i < storage.size(); ++i) {
      if (!std::isnan(Host<T>::to(storage[i]))) return false;
    }
    return true;
  }
};

struct Case {
  int64_t S, B, K, N;
  bool shared_input, shared_mask;
  double p;
  bool misalign;
  uint64_t seed;
};

std::string describe(const char* dtype, const char* what, const Case& c) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "%s %s S=%lld B=%lld K=%lld N=%lld shared_input=%d shared_mask=%d p=%.1f%s",
                dtype, what, (long long)c.S, (long long)c.B, (long long)c.K, (long long)c.N,
                c.shared_input, c.shared_mask, c.p, c.misalign ? " misaligned" : "");
  return buf;
}

// Compares got[i] with ref[i] to tol * mag[i] (mag = sum of |terms|); reports the first failure.
template <typename T>
bool compare(Buf<T>& got, const std::vector<double>& ref, const std::vector<double>& mag,
             double tol, double atol, const std::string& what) {
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = Host<T>::to(got[i]);
    const double err = std::fabs(g - ref[i]);
    // atol only where some term is nonzero: an all-zero sum (B == 0) must come out exactly 0.
    const double bound = tol * mag[i] + (mag[i] > 0 ? atol : 0.0) + 1e-300;
    if (!(err <= bound)) {
      std::printf("FAIL %s: element %zu got %.17g want %.17g (|err| %.3g > %.3g)\n", what.c_str(),
                  i, g, ref[i], err, bound);
      return false;
    }
    if (mag[i] > 0) g_worst = std::max(g_worst, std::max(err - atol, 0.0) / mag[i]);
  }
  if (!got.guard_intact()) {
    std::printf("FAIL %s: wrote past the end of the output\n", what.c_str());
    return false;
  }
  return true;
}

void record(bool ok) {
  ++g_cases;
  if (!ok) ++g_failed;
}

template <typename T>
void run_case(const Case& c, std::mt19937_64& rng) {
  using H = Host<T>;
  const int64_t S = c.S, B = c.B, K = c.K, N = c.N;
  const int64_t x_rows = c.shared_input ? B : S * B;
  int64_t rng_state[2] = {static_cast<int64_t>(c.seed), static_cast<int64_t>(0xfffffffdull)};
  MCDropoutLinearParams p{};
  p.num_samples = S;
  p.rows = B;
  p.in_features = K;
  p.out_features = N;
  p.shared_input = c.shared_input;
  p.shared_mask = c.shared_mask;
  p.threshold = bdlkern::keep_threshold(c.p);
  p.scale = 1.0 / (1.0 - c.p);
  p.rng_state = rng_state;
  p.dtype = H::kType;
  p.stream = bdlkern::simt::current_stream();  // the emulated current stream (simt_stream.h)

  // Inputs rounded to T first; the reference uses the rounded values.
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  auto fill = [&](Buf<T>& b) {
    for (size_t i = 0; i < b.n; ++i) b[i] = H::from(dist(rng));
  };
  Buf<T> x(x_rows * K, c.misalign), w(N * K, c.misalign), bias(N, c.misalign),
      dy(S * B * N, c.misalign);
  fill(x), fill(w), fill(bias), fill(dy);

  const MCDropoutMask mask{bdlkern::make_stream(rng_state, bdlkern::kStreamMCDropout), p.threshold,
                           B, K, c.shared_mask};
  auto xm = [&](int64_t s, int64_t b, int64_t k) {  // masked, scaled input
    const int64_t row = c.shared_input ? b : s * B + b;
    return mask.keep(s, b, k) ? H::to(x[row * K + k]) * p.scale : 0.0;
  };

  // forward
  {
    Buf<T> y(S * B * N, c.misalign);
    y.fill_nan();
    bdlkern::mc_dropout_linear_forward(SimtTag{}, p, x.data(), w.data(), bias.data(), y.data());
    std::vector<double> ref(S * B * N), mag(S * B * N);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t n = 0; n < N; ++n) {
          double acc = H::to(bias[n]), m = std::fabs(acc);
          for (int64_t k = 0; k < K; ++k) {
            const double t = xm(s, b, k) * H::to(w[n * K + k]);
            acc += t, m += std::fabs(t);
          }
          ref[(s * B + b) * N + n] = acc, mag[(s * B + b) * N + n] = m;
        }
    record(compare(y, ref, mag, H::kTol, H::kAtol, describe(H::kName, "forward", c)));
  }
  // grad_input
  {
    Buf<T> gx(x_rows * K, c.misalign);
    gx.fill_nan();
    bdlkern::mc_dropout_linear_grad_input(SimtTag{}, p, dy.data(), w.data(), gx.data());
    std::vector<double> ref(x_rows * K, 0.0), mag(x_rows * K, 0.0);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < K; ++k) {
          if (!mask.keep(s, b, k)) continue;
          double acc = 0.0, m = 0.0;
          for (int64_t n = 0; n < N; ++n) {
            const double t = H::to(dy[(s * B + b) * N + n]) * H::to(w[n * K + k]);
            acc += t, m += std::fabs(t);
          }
          const int64_t row = c.shared_input ? b : s * B + b;
          ref[row * K + k] += acc * p.scale, mag[row * K + k] += m * p.scale;
        }
    record(compare(gx, ref, mag, H::kTol, H::kAtol, describe(H::kName, "grad_input", c)));
  }
  // grad_weight
  {
    Buf<T> gw(N * K, c.misalign);
    gw.fill_nan();
    bdlkern::mc_dropout_linear_grad_weight(SimtTag{}, p, dy.data(), x.data(), gw.data());
    std::vector<double> ref(N * K, 0.0), mag(N * K, 0.0);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < K; ++k) {
          const double v = xm(s, b, k);
          if (v == 0.0) continue;
          for (int64_t n = 0; n < N; ++n) {
            const double t = H::to(dy[(s * B + b) * N + n]) * v;
            ref[n * K + k] += t, mag[n * K + k] += std::fabs(t);
          }
        }
    // B == 0: mag is 0 everywhere, so the bound demands exact zeros.
    record(compare(gw, ref, mag, H::kTol, H::kAtol, describe(H::kName, "grad_weight", c)));
  }
}

// W = I, bias = 0, X = ones, p = 0.5: Y / scale must be the mask, exactly.
template <typename T>
void run_mask_case(int64_t S, int64_t B, int64_t K, bool shared_input, bool shared_mask,
                   uint64_t seed) {
  using H = Host<T>;
  int64_t rng_state[2] = {static_cast<int64_t>(seed), 7};
  MCDropoutLinearParams p{};
  p.num_samples = S, p.rows = B, p.in_features = K, p.out_features = K;
  p.shared_input = shared_input, p.shared_mask = shared_mask;
  p.threshold = bdlkern::keep_threshold(0.5);
  p.scale = 2.0;
  p.rng_state = rng_state;
  p.dtype = H::kType;
  p.stream = bdlkern::simt::current_stream();
  const int64_t x_rows = shared_input ? B : S * B;
  Buf<T> x(x_rows * K, false), w(K * K, false), bias(K, false), y(S * B * K, false);
  for (size_t i = 0; i < x.n; ++i) x[i] = H::from(1.0);
  for (int64_t n = 0; n < K; ++n)
    for (int64_t k = 0; k < K; ++k) w[n * K + k] = H::from(n == k ? 1.0 : 0.0);
  for (int64_t n = 0; n < K; ++n) bias[n] = H::from(0.0);
  y.fill_nan();
  bdlkern::mc_dropout_linear_forward(SimtTag{}, p, x.data(), w.data(), bias.data(), y.data());
  const MCDropoutMask mask{bdlkern::make_stream(rng_state, bdlkern::kStreamMCDropout), p.threshold,
                           B, K, shared_mask};
  int64_t kept = 0, wrong = 0;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        const double got = H::to(y[(s * B + b) * K + k]) / p.scale;
        const double want = mask.keep(s, b, k) ? 1.0 : 0.0;
        kept += want == 1.0;
        if (got != want) ++wrong;
      }
  const double frac = static_cast<double>(kept) / static_cast<double>(S * B * K);
  const bool ok = wrong == 0 && y.guard_intact() && frac > 0.4 && frac < 0.6;
  if (!ok) {
    std::printf("FAIL %s mask S=%lld B=%lld K=%lld shared_input=%d shared_mask=%d: %lld wrong, "
                "keep fraction %.3f\n",
                H::kName, (long long)S, (long long)B, (long long)K, shared_input, shared_mask,
                (long long)wrong, frac);
  }
  record(ok);
}

template <typename T>
void sweep(bool quick) {
  std::mt19937_64 rng(1234);
  const int64_t Ss[] = {1, 3}, Bs[] = {0, 1, 5, 37}, Ks[] = {1, 7, 16, 70}, Ns[] = {1, 9, 33, 64};
  const double ps[] = {0.0, 0.3, 0.9};
  const int before = g_failed, cases_before = g_cases;
  g_worst = 0.0;
  uint64_t seed = 0x9e3779b97f4a7c15ull;
  int i = 0;
  for (int64_t S : Ss)
    for (int64_t B : Bs)
      for (int64_t K : Ks)
        for (int64_t N : Ns)
          for (int si = 0; si < 2; ++si)
            for (int sm = 0; sm < 2; ++sm)
              for (double pp : ps) {
                ++i;
                // --quick: every 7th combination (7 is coprime to every loop length).
                if (quick && i % 7 != 0) continue;
                const bool misalign = i % 11 == 0;
                run_case<T>(Case{S, B, K, N, si == 1, sm == 1, pp, misalign, seed + i}, rng);
              }
  for (int si = 0; si < 2; ++si)
    for (int sm = 0; sm < 2; ++sm) {
      run_mask_case<T>(3, 37, 70, si == 1, sm == 1, 42 + si + 2 * sm);
      run_mask_case<T>(2, 65, 64, si == 1, sm == 1, 99 + si + 2 * sm);
    }
  std::printf("%-8s %5d checks, %d failed, worst |err| / sum|terms| %.2e\n", Host<T>::kName,
              g_cases - cases_before, g_failed - before, g_worst);
  std::fflush(stdout);
}

}  // namespace

// Arguments: --quick (every 7th combination), a dtype name (float64 float32 float16 bfloat16) to
// run only that dtype.
int main(int argc, char** argv) {
  bool quick = false;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      only = argv[i];
    }
  }
  auto want = [&](const char* name) { return only.empty() || only == name; };
  if (want("float64")) sweep<double>(quick);
  if (want("float32")) sweep<float>(quick);
  if (want("float16")) sweep<__half>(quick);
  if (want("bfloat16")) sweep<__nv_bfloat16>(quick);
  std::printf("%s: %d checks, %d failed\n", g_failed ? "FAILED" : "OK", g_cases, g_failed);
  return g_failed ? 1 : 0;
}
