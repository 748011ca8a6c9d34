// The identity of the SIMT emulator's "current stream": what BackendTraits<SimtTag>::stream hands
// the kernels' entry points, and what simt.h's launch() checks every launch against, so that a
// launch on another stream (the legacy default stream, nullptr, say) fails under the emulator as
// it would misbehave on a GPU (out of order with the caller's work on the current stream). The
// emulator is synchronous: the stream is an identity only, never a queue.
#pragma once

namespace bdlkern {
namespace simt {

// One token per extension (an inline function's static is shared by every file that includes it).
inline void* current_stream() {
  static char token;
  return &token;
}

}  // namespace simt
}  // namespace bdlkern
