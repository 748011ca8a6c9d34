# bdlkern_find_torch(): find_package(Torch REQUIRED) without letting torch's CMake config probe
# for CUDA on its own.
#
# What happens without this (checked with torch 2.14.1+cu130 from pip, CMake 3.25, a CUDA 13.0
# toolkit at /usr/local/cuda-13.0 whose `nvcc` on PATH is a wrapper script in /usr/local/bin):
#
#   TorchConfig.cmake -> Caffe2Config.cmake -> Caffe2/public/cuda.cmake, for *every* consumer of a
#   CUDA build of torch, even one that only wants the CPU library. That file
#     * runs the legacy FindCUDA, which derives the toolkit root from the `nvcc` on PATH. With a
#       wrapper script it guesses /usr/local, finds no cuda_runtime.h / libcudart there, and then
#       Caffe2Config stops with a FATAL_ERROR ("Your installed Caffe2 version uses CUDA but I cannot
#       find the CUDA libraries"). On a machine with no toolkit at all it fails the same way.
#   With a hint (-DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda-13.0) configuration succeeds, but then
#     * enable_language(CUDA) runs: nvcc becomes a hard requirement of a CPU-only build, and with
#       the compiler checks and a try_run against libcudart, configuring takes ~5 s instead of
#       ~0.5 s;
#     * CMAKE_CUDA_ARCHITECTURES is overridden with OFF (a warning says to use TORCH_CUDA_ARCH_LIST)
#       and -gencode flags for an auto-detected list are appended to CMAKE_CUDA_FLAGS; with no GPU
#       that list starts at sm_50, which CUDA 13's nvcc no longer accepts;
#     * TORCH_LIBRARIES contains CUDA_nvrtc_LIBRARY-NOTFOUND (libnvrtc is in the `nvidia` wheel, not
#       in this toolkit), which breaks target_link_libraries(... ${TORCH_LIBRARIES}).
#   cuBLAS / cuDNN are not needed by consumers: Caffe2 only searches cuDNN when CAFFE2_USE_CUDNN is
#   set (it is not) and only references CUDA::cublas from caffe2::cublas, which nobody links.
#
# What we do instead: cuda.cmake starts with an include guard, `if(TARGET torch::cudart) return()`,
# and the imported torch targets only ever refer to CUDA through that one target (c10_cuda and
# torch_cuda link `torch::cudart`). So we define torch::cudart ourselves before find_package:
#   * CPU build (BDLKERN_CUDA=OFF): an empty INTERFACE target. No CUDA probing at all; the result
#     is the same with or without a toolkit, nvcc or GPU. Our library links torch_cpu and c10 only,
#     so nothing CUDA-related ever reaches a link line. (libtorch_cuda.so still loads its own CUDA
#     libraries at run time through its RPATH when something else pulls it in.)
#   * CUDA build: an INTERFACE target that forwards to CUDA::cudart from CMake's own
#     find_package(CUDAToolkit), run by the caller after enable_language(CUDA). Architectures,
#     nvcc flags and the runtime library then stay under our control.
# If a future torch drops that guard, cuda.cmake runs as before; the hints set below
# (CUDA_TOOLKIT_ROOT_DIR from $CUDA_HOME, or from the toolkit found for BDLKERN_CUDA=ON) give it the
# best chance to succeed.
#
# For a CPU-only build of torch, Caffe2Config never includes cuda.cmake and the stub is unused.
#
# TorchConfig.cmake also prints "library kineto not found": harmless, pip wheels link kineto into
# libtorch_cpu.so and ship no separate libkineto.

macro(bdlkern_find_torch)
  if(NOT TARGET torch::cudart)
    add_library(torch::cudart INTERFACE IMPORTED)
    if(BDLKERN_CUDA)
      if(NOT TARGET CUDA::cudart)
        message(FATAL_ERROR "bdlkern_find_torch: call find_package(CUDAToolkit) first")
      endif()
      set_property(TARGET torch::cudart PROPERTY INTERFACE_LINK_LIBRARIES CUDA::cudart)
    endif()
  endif()

  # Fallback hints for torch's FindCUDA, used only if cuda.cmake runs despite the stub above.
  if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR)
    if(DEFINED CUDAToolkit_BIN_DIR)
      get_filename_component(_bdlkern_cuda_root "${CUDAToolkit_BIN_DIR}" DIRECTORY)
    elseif(DEFINED ENV{CUDA_HOME})
      set(_bdlkern_cuda_root "$ENV{CUDA_HOME}")
    endif()
    if(DEFINED _bdlkern_cuda_root AND EXISTS "${_bdlkern_cuda_root}/include/cuda_runtime.h")
      set(CUDA_TOOLKIT_ROOT_DIR "${_bdlkern_cuda_root}")
    endif()
    unset(_bdlkern_cuda_root)
  endif()

  find_package(Torch REQUIRED)

  # torch_cpu and c10 are what the CPU library links; they exist for every libtorch >= 1.x.
  foreach(_bdlkern_t IN ITEMS torch_cpu c10)
    if(NOT TARGET ${_bdlkern_t})
      message(FATAL_ERROR "bdlkern: torch's CMake config did not define the '${_bdlkern_t}' target "
                          "(TorchConfig.cmake at ${Torch_DIR})")
    endif()
  endforeach()
  unset(_bdlkern_t)

  # Caffe2's mkl.cmake gives caffe2::mkl the link directories ${MKL_ROOT}/lib/intel64 etc. even when
  # MKL was not found (MKL_ROOT empty), which puts /lib/intel64:/lib/intel64_win:/lib/win-x64 into
  # the RUNPATH of everything linked against torch_cpu. Drop them when there is no MKL.
  if(TARGET caffe2::mkl AND NOT MKL_ROOT)
    set_property(TARGET caffe2::mkl PROPERTY INTERFACE_LINK_DIRECTORIES "")
  endif()

  # Does ATen use OpenMP for at::parallel_for? (ATen/Config.h is generated at torch build time.)
  set(BDLKERN_TORCH_OPENMP OFF)
  find_file(_bdlkern_aten_config ATen/Config.h PATHS ${TORCH_INCLUDE_DIRS} NO_DEFAULT_PATH)
  if(_bdlkern_aten_config)
    file(STRINGS "${_bdlkern_aten_config}" _bdlkern_omp REGEX "^#define AT_PARALLEL_OPENMP 1")
    if(_bdlkern_omp)
      set(BDLKERN_TORCH_OPENMP ON)
    endif()
    unset(_bdlkern_omp)
  else()
    message(WARNING "bdlkern: ATen/Config.h not found under ${TORCH_INCLUDE_DIRS}; "
                    "assuming torch does not use OpenMP")
  endif()
  unset(_bdlkern_aten_config CACHE)
endmacro()
