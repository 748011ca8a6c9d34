// SIMT emulation: compile CUDA kernel sources with the host compiler and run them on the CPU.
//
// bdlkern has no GPU to test on, so every `.cu` file is also compiled by g++ with this header in
// front (see csrc/testing/simt/*.cpp) into the `_C_simt` test extension. The tests then run the real CUDA
// kernel source on CPU tensors and compare it with the CPU kernels.
//
// Execution model (faithful where kernels can observe it):
//   * the threads of a block are real host threads, so data races and missing barriers show up
//     (and ThreadSanitizer can see them); blocks of a grid run one after another;
//   * `__syncthreads()` is a barrier over the block's threads, `__syncwarp()` over the 32 lanes of
//     a warp (linear thread id / 32, as on hardware);
//   * static `__shared__` arrays become function-local statics: one copy shared by the block's
//     threads. That is why blocks run one at a time and launches are serialised (one launch at a
//     time in the whole process). Kernels declare them with BDL_SHARED(type, name, dims), which
//     also registers the array with the launch (a bare `__shared__` does not compile here). The
//     emulator fills every array of the kernel with 0xff bytes (NaN in every float type, -1 in
//     every integer) when it is first seen and again before each block: a kernel that reads shared
//     memory it did not write in the same block (expecting zeros, or a value an earlier block or
//     launch left) reads garbage here as it would on a GPU;
//   * warp shuffles exchange values through a per-thread slot between two warp barriers;
//   * `nvcuda::wmma` fragments hold the whole 16x16 tile in every lane: loads and mma run per lane,
//     stores are done by lane 0 between warp barriers;
//   * `atomicAdd` uses the compiler's atomic builtins.
// Only this subset exists (plus what the CUDA headers give host code: dim3, uint3, __half,
// __nv_bfloat16 and their conversions). A kernel that needs more must first extend this header
// and its tests (tests/test_simt.py, csrc/testing/selftest.cu).
#pragma once

#ifndef BDLKERN_SIMT
#define BDLKERN_SIMT 1
#endif

// CUDA's own vector types and half/bfloat16 types (host-compilable headers).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <stdint.h>
#include <string.h>

#include <bdlkern/common/simt_stream.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- qualifiers -------------------------------------------------------------------------------
// host_defines.h defines the qualifiers as nothing for a host compiler; make the meaning explicit.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
// A bare __shared__ would escape the poisoning (see BDL_SHARED below): make it a compile error.
#define __shared__ bdlkern_simt_declare_shared_memory_with_BDL_SHARED
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

namespace bdlkern {
namespace simt {

constexpr int kWarpSize = 32;
constexpr unsigned char kSharedPoison = 0xff;
constexpr size_t kMaxStaticSharedBytes = 48 * 1024;

// One emulated launch at a time in the process (the shared arrays are statics).
inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

// The static shared arrays of one kernel, as its BDL_SHARED declarations registered them (kept
// across launches, so that a launch can poison them before its first block).
struct SharedArrays {
  std::mutex mutex;
  std::vector<std::pair<void*, size_t>> arrays;
  size_t bytes = 0;  // the kernel's static shared memory per block

  // Fills every array with kSharedPoison (a GPU gives a block shared memory with whatever its last
  // user left there). Called while no emulated thread runs: before a launch's first block, and by
  // the last thread to reach a block's end, before any starts the next block.
  void poison() {
    for (const auto& a : arrays) memset(a.first, kSharedPoison, a.second);
  }
  static void poison_fn(void* self) { static_cast<SharedArrays*>(self)->poison(); }
};

inline SharedArrays& shared_arrays_of(const void* kernel) {
  static std::mutex mutex;
  static std::vector<std::pair<const void*, std::unique_ptr<SharedArrays>>> by_kernel;
  std::lock_guard<std::mutex> lock(mutex);
  for (auto& k : by_kernel) {
    if (k.first == kernel) return *k.second;
  }
  by_kernel.emplace_back(kernel, std::make_unique<SharedArrays>());
  return *by_kernel.back().second;
}
constexpr int kMaxThreadsPerBlock = 1024;

// A reusable barrier for a fixed number of threads. A wait that lasts longer than the deadlock
// timeout means some thread of the group never arrives (a barrier inside divergent code, or a
// thread that returned early): the emulator says so and aborts instead of hanging the tests.
// Every arrival names its site (`what`: a __syncthreads call site as "file:line", or "end of
// block"). Threads of one generation that arrive at different sites are a divergent barrier, or
// a barrier the others reach after some thread has exited (it arrives at "end of block"): a GPU
// would hang or silently release them early; the emulator aborts with both sites.
class Barrier {
 public:
  void reset(int count) {
    count_ = count;
    waiting_ = 0;
  }

  // `on_release(context)`, when given, runs in the last thread to arrive, before any is released.
  void arrive_and_wait(const char* what, void (*on_release)(void*) = nullptr,
                       void* context = nullptr) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (waiting_ == 0) {
      site_ = what;
    } else if (std::strcmp(site_, what) != 0) {
      std::fprintf(stderr,
                   "bdlkern SIMT emulator: divergent barrier: %d thread(s) wait at %s while another "
                   "arrives at %s (a barrier not reached by every thread of the block, or reached "
                   "after some thread exited)\n",
                   waiting_, site_, what);
      std::abort();
    }
    if (++waiting_ == count_) {
      if (on_release != nullptr) on_release(context);
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(120),
                      [&] { return generation_ != generation; })) {
      std::fprintf(stderr,
                   "bdlkern SIMT emulator: deadlock in %s (%d of %d threads arrived); a barrier "
                   "is not reached by every thread of its group\n",
                   what, waiting_, count_);
      std::abort();
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_ = 0;
  int waiting_ = 0;
  const char* site_ = "";
  uint64_t generation_ = 0;
};

// State shared by the threads of the block being run.
struct BlockState {
  explicit BlockState(int num_threads)
      : num_threads(num_threads),
        num_warps((num_threads + kWarpSize - 1) / kWarpSize),
        warp_barriers(new Barrier[num_warps]),
        shuffle_slots(static_cast<size_t>(num_threads), 0) {
    block_barrier.reset(num_threads);
    for (int w = 0; w < num_warps; ++w) {
      const int lanes = num_threads - w * kWarpSize;
      warp_barriers[w].reset(lanes < kWarpSize ? lanes : kWarpSize);
    }
  }

  int num_threads;
  int num_warps;
  SharedArrays* shared = nullptr;  // the running kernel's static shared arrays
  Barrier block_barrier;
  std::unique_ptr<Barrier[]> warp_barriers;
  std::vector<uint64_t> shuffle_slots;  // one 8-byte slot per thread
};

// Per-thread view of the launch (what CUDA keeps in special registers).
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int linear_tid = 0;
  BlockState* block = nullptr;
};

inline ThreadState& this_thread() {
  static thread_local ThreadState state;
  return state;
}

// Called by each thread at a BDL_SHARED declaration. The first thread to reach an array the
// kernel has never declared before poisons it, under the lock, so no thread can pass the
// declaration (and touch the array) before the poison is in place.
inline void register_shared(void* array, size_t bytes) {
  SharedArrays& shared = *this_thread().block->shared;
  std::lock_guard<std::mutex> lock(shared.mutex);
  for (const auto& a : shared.arrays) {
    if (a.first == array) return;
  }
  memset(array, kSharedPoison, bytes);
  shared.arrays.emplace_back(array, bytes);
  shared.bytes += bytes;
}

inline int lane_id() { return this_thread().linear_tid % kWarpSize; }
inline int warp_id() { return this_thread().linear_tid / kWarpSize; }

inline void warp_barrier() {
  ThreadState& t = this_thread();
  t.block->warp_barriers[t.linear_tid / kWarpSize].arrive_and_wait("__syncwarp");
}

// Runs `kernel(args...)` over `grid` x `block` threads. The emulator is synchronous, but `stream`
// must be the emulated current stream (simt_stream.h), as a GPU launch must be on the caller's
// current stream; dynamic shared memory does not exist here, so `smem` must be 0.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, void* stream,
            Args&&... args) {
  if (stream != current_stream()) {
    throw std::invalid_argument(
        "bdlkern SIMT emulator: launch on a stream other than the current one (pass the stream "
        "BackendTraits<Tag>::stream gives, not nullptr: on a GPU the legacy default stream would run "
        "out of order with the caller's work)");
  }
  if (smem != 0) {
    throw std::invalid_argument("bdlkern SIMT emulator: dynamic shared memory is not supported");
  }
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > static_cast<uint64_t>(kMaxThreadsPerBlock)) {
    throw std::invalid_argument("bdlkern SIMT emulator: block size " + std::to_string(threads) +
                                " outside [1, 1024]");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
    throw std::invalid_argument("bdlkern SIMT emulator: empty grid");
  }
  // CUDA's launch limits, which a GPU enforces with an error: an emulated launch that a device
  // would reject must fail here too (gridDim.x may reach 2^31 - 1, y and z only 65535; blockDim.z
  // at most 64).
  if (grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u) {
    throw std::invalid_argument("bdlkern SIMT emulator: grid (" + std::to_string(grid.x) + ", " +
                                std::to_string(grid.y) + ", " + std::to_string(grid.z) +
                                ") exceeds CUDA's limits (x <= 2^31 - 1, y and z <= 65535)");
  }
  if (block.x > 1024u || block.y > 1024u || block.z > 64u) {
    throw std::invalid_argument("bdlkern SIMT emulator: block (" + std::to_string(block.x) + ", " +
                                std::to_string(block.y) + ", " + std::to_string(block.z) +
                                ") exceeds CUDA's limits (x, y <= 1024, z <= 64)");
  }

  // Static __shared__ storage is one copy per kernel: one launch at a time.
  std::lock_guard<std::mutex> guard(launch_mutex());
  SharedArrays& shared = shared_arrays_of(reinterpret_cast<const void*>(kernel));
  shared.poison();

  const std::tuple<std::decay_t<KArgs>...> params(std::forward<Args>(args)...);
  const int num_threads = static_cast<int>(threads);
  BlockState state(num_threads);
  state.shared = &shared;

  auto body = [&](int tid) {
    ThreadState& t = this_thread();
    t.linear_tid = tid;
    t.block = &state;
    t.block_dim = block;
    t.grid_dim = grid;
    t.thread_idx.x = static_cast<unsigned>(tid) % block.x;
    t.thread_idx.y = (static_cast<unsigned>(tid) / block.x) % block.y;
    t.thread_idx.z = static_cast<unsigned>(tid) / (block.x * block.y);
    for (unsigned bz = 0; bz < grid.z; ++bz) {
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          t.block_idx.x = bx;
          t.block_idx.y = by;
          t.block_idx.z = bz;
          std::apply(kernel, params);
          // No thread may start the next block (and reuse its shared memory) before all are done;
          // the last to arrive poisons the shared memory for it.
          state.block_barrier.arrive_and_wait("end of block", SharedArrays::poison_fn, &shared);
        }
      }
    }
    t.block = nullptr;
  };

  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(num_threads - 1));
  for (int tid = 1; tid < num_threads; ++tid) workers.emplace_back(body, tid);
  body(0);
  for (auto& w : workers) w.join();
  // A GPU kernel gets at most 48 KiB of static shared memory per block (ptxas refuses more).
  if (shared.bytes > kMaxStaticSharedBytes) {
    throw std::invalid_argument("bdlkern SIMT emulator: the kernel declares " +
                                std::to_string(shared.bytes) +
                                " bytes of static shared memory, more than CUDA's 49152 per block");
  }
}

// ---- warp shuffles ------------------------------------------------------------------------------
// Every lane publishes its value, the warp meets, each lane reads its source lane, the warp meets
// again (so no slot is overwritten while another lane still reads it).
template <typename T>
T shuffle_from(T value, int src_lane_in_warp, bool use_own) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value,
                "SIMT shuffles support trivially copyable types of at most 8 bytes");
  ThreadState& t = this_thread();
  const int warp_base = (t.linear_tid / kWarpSize) * kWarpSize;
  uint64_t& mine = t.block->shuffle_slots[static_cast<size_t>(t.linear_tid)];
  memcpy(&mine, &value, sizeof(T));
  warp_barrier();
  T result = value;
  const int src = warp_base + src_lane_in_warp;
  if (!use_own && src < t.block->num_threads) {
    memcpy(&result, &t.block->shuffle_slots[static_cast<size_t>(src)], sizeof(T));
  }
  warp_barrier();
  return result;
}

}  // namespace simt
}  // namespace bdlkern

// ---- the CUDA built-ins, as seen from kernel code ------------------------------------------------
#define threadIdx (::bdlkern::simt::this_thread().thread_idx)
#define blockIdx (::bdlkern::simt::this_thread().block_idx)
#define blockDim (::bdlkern::simt::this_thread().block_dim)
#define gridDim (::bdlkern::simt::this_thread().grid_dim)
#define warpSize (::bdlkern::simt::kWarpSize)

namespace bdlkern {
namespace simt {
inline void sync_block(const char* site) { this_thread().block->block_barrier.arrive_and_wait(site); }
}  // namespace simt
}  // namespace bdlkern
#define BDLKERN_SIMT_STR2(x) #x
#define BDLKERN_SIMT_STR(x) BDLKERN_SIMT_STR2(x)
// Each call site names itself, so that threads waiting at two different barriers are caught.
// A static shared array, registered with the running launch (see register_shared).
#define BDL_SHARED(type, name, dims) \
  static type name dims;             \
  ::bdlkern::simt::register_shared(static_cast<void*>(&name), sizeof(name))
#define __syncthreads() ::bdlkern::simt::sync_block("__syncthreads at " __FILE__ ":" BDLKERN_SIMT_STR(__LINE__))

// The mask is accepted for source compatibility; the emulator synchronises the whole warp.
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  (void)mask;
  ::bdlkern::simt::warp_barrier();
}

// Value of lane (lane ^ lane_mask) within segments of `width` lanes; a source in a later segment
// returns the caller's own value (CUDA's rule).
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  (void)mask;
  const int lane = ::bdlkern::simt::lane_id();
  const int src = lane ^ lane_mask;
  const bool own = src >= (lane / width + 1) * width;
  return ::bdlkern::simt::shuffle_from(var, src, own);
}

// Value of lane (lane + delta) within the caller's segment of `width` lanes, else its own value.
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  (void)mask;
  const int lane = ::bdlkern::simt::lane_id();
  const bool own = (lane % width) + static_cast<int>(delta) >= width;
  return ::bdlkern::simt::shuffle_from(var, lane + static_cast<int>(delta), own);
}

// Broadcast: the value of lane `src_lane` (mod width) of the caller's segment.
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  (void)mask;
  const int lane = ::bdlkern::simt::lane_id();
  const int src = (lane / width) * width + ((src_lane % width) + width) % width;
  return ::bdlkern::simt::shuffle_from(var, src, false);
}

// ---- atomics -----------------------------------------------------------------------------------
inline int atomicAdd(int* address, int val) {
  return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
}
inline unsigned atomicAdd(unsigned* address, unsigned val) {
  return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long val) {
  return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
}
namespace bdlkern {
namespace simt {
template <typename F, typename Bits>
F atomic_add_float(F* address, F val) {
  static_assert(sizeof(F) == sizeof(Bits), "bit width mismatch");
  Bits* bits = reinterpret_cast<Bits*>(address);
  Bits expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    F old;
    memcpy(&old, &expected, sizeof(F));
    const F updated = old + val;
    Bits desired;
    memcpy(&desired, &updated, sizeof(F));
    if (__atomic_compare_exchange_n(bits, &expected, desired, /*weak=*/true, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED)) {
      return old;
    }
  }
}
}  // namespace simt
}  // namespace bdlkern
inline float atomicAdd(float* address, float val) {
  return ::bdlkern::simt::atomic_add_float<float, uint32_t>(address, val);
}
inline double atomicAdd(double* address, double val) {
  return ::bdlkern::simt::atomic_add_float<double, uint64_t>(address, val);
}

// ---- nvcuda::wmma (m16n16k16 only) --------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
}  // namespace detail

// Every lane holds the whole tile, element (r, c) at x[r * 16 + c] (logical row-major order).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the SIMT emulator supports m16n16k16 only");
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value ||
                    std::is_same<T, float>::value,
                "fragment element type must be half, bfloat16 or float");

 public:
  using element_type = T;
  static constexpr int num_elements = 16 * 16;
  T x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& frag, const T& value) {
  for (int i = 0; i < 16 * 16; ++i) frag.x[i] = value;
}

namespace detail {
template <typename T>
inline void load_tile(T* dst, const T* src, unsigned ldm, bool col_major) {
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      dst[r * 16 + c] = col_major ? src[static_cast<size_t>(c) * ldm + r]
                                  : src[static_cast<size_t>(r) * ldm + c];
    }
  }
}
}  // namespace detail

// matrix_a / matrix_b: the layout is part of the fragment type.
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& frag, const T* ptr,
                             unsigned ldm) {
  static_assert(std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value,
                "matrix_a/matrix_b fragments need a row_major or col_major layout");
  detail::load_tile(frag.x, ptr, ldm, std::is_same<Layout, col_major>::value);
}

// accumulator: the memory layout is a run-time argument.
template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& frag, const T* ptr,
                             unsigned ldm, layout_t layout) {
  detail::load_tile(frag.x, ptr, ldm, layout == mem_col_major);
}

template <typename T>
inline void store_matrix_sync(T* ptr, const fragment<accumulator, 16, 16, 16, T, void>& frag,
                              unsigned ldm, layout_t layout) {
  __syncwarp();
  if (::bdlkern::simt::lane_id() == 0) {
    for (int r = 0; r < 16; ++r) {
      for (int c = 0; c < 16; ++c) {
        T& dst = layout == mem_col_major ? ptr[static_cast<size_t>(c) * ldm + r]
                                         : ptr[static_cast<size_t>(r) * ldm + c];
        dst = frag.x[r * 16 + c];
      }
    }
  }
  __syncwarp();
}

// d = a * b + c, products and sums in float (k ascending), rounded once to the accumulator type.
template <typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TC, void>& d,
                     const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, TC, void>& c) {
  static_assert(std::is_same<TA, TB>::value, "matrix_a and matrix_b must have one element type");
  static_assert(!std::is_same<TA, float>::value, "multiplicands must be half or bfloat16");
  static_assert(!std::is_same<TA, __nv_bfloat16>::value || std::is_same<TC, float>::value,
                "bfloat16 multiplicands accumulate in float");
  TC result[16 * 16];
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 16; ++col) {
      float acc = detail::to_float(c.x[r * 16 + col]);
      for (int k = 0; k < 16; ++k) {
        acc += detail::to_float(a.x[r * 16 + k]) * detail::to_float(b.x[k * 16 + col]);
      }
      result[r * 16 + col] = detail::from_float<TC>(acc);
    }
  }
  for (int i = 0; i < 16 * 16; ++i) d.x[i] = result[i];
}

}  // namespace wmma
}  // namespace nvcuda
