# CUDA toolchain for BDLKERN_CUDA=ON.
#
# bdlkern_enable_cuda()       before find_package(Torch): picks nvcc, sets the default
#                             architectures, enables the CUDA language, finds the CUDA toolkit.
# bdlkern_check_torch_cuda()  after find_package(Torch): torch must be a CUDA build whose CUDA
#                             major version matches the toolkit.
#
# Both are macros because enable_language() must run at directory scope.

macro(bdlkern_enable_cuda)
  # nvcc: CMAKE_CUDA_COMPILER, else $CUDACXX (read by CMake itself), else $CUDA_HOME/bin/nvcc, else
  # CMake's search of PATH. A wrapper script on PATH is fine: CMake asks nvcc for its real
  # toolkit root (`nvcc -v` prints TOP=...).
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX}
     AND DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
    set(CMAKE_CUDA_COMPILER "$ENV{CUDA_HOME}/bin/nvcc" CACHE FILEPATH "CUDA compiler")
  endif()

  # Must be set before enable_language(CUDA), which would otherwise pick nvcc's default. A value
  # given by the user (-DCMAKE_CUDA_ARCHITECTURES=... or $CUDAARCHS) wins.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
    set(CMAKE_CUDA_ARCHITECTURES "80;86;89;90" CACHE STRING "CUDA architectures to build for")
  endif()

  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    message(FATAL_ERROR
      "bdlkern: BDLKERN_CUDA=ON but no working CUDA compiler was found. Point CMake at nvcc with "
      "-DCMAKE_CUDA_COMPILER=/path/to/cuda/bin/nvcc (or set CUDA_HOME / CUDACXX), or configure "
      "with -DBDLKERN_CUDA=OFF for the CPU-only library.")
  endif()
  enable_language(CUDA)

  # CMake < 3.26 does not know how to ask nvcc for C++20 (CUDA_STANDARD 20); nvcc >= 12 accepts
  # -std=c++20.
  if(CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA" AND NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    if(CMAKE_CUDA_COMPILER_VERSION VERSION_LESS 12.0)
      message(FATAL_ERROR "bdlkern: nvcc ${CMAKE_CUDA_COMPILER_VERSION} cannot compile C++20; "
                          "CUDA >= 12 is required")
    endif()
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()

  # The toolkit that belongs to this nvcc (CMake passes the compiler's toolkit root on).
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "bdlkern: CUDA ${CUDAToolkit_VERSION} at ${CUDAToolkit_BIN_DIR}, "
                 "architectures ${CMAKE_CUDA_ARCHITECTURES}")
endmacro()

macro(bdlkern_check_torch_cuda)
  if(NOT TARGET torch_cuda OR NOT TARGET c10_cuda)
    message(FATAL_ERROR
      "bdlkern: BDLKERN_CUDA=ON but the torch found at ${Torch_DIR} is a CPU-only build "
      "(no torch_cuda / c10_cuda targets). Use a CUDA build of torch or -DBDLKERN_CUDA=OFF.")
  endif()
  # torch's CUDA version: version.py of a pip/conda torch (absent from libtorch zip archives, in
  # which case the check is skipped).
  if(EXISTS "${TORCH_INSTALL_PREFIX}/version.py")
    file(STRINGS "${TORCH_INSTALL_PREFIX}/version.py" _bdlkern_torch_cuda REGEX "^cuda[:=]")
    if(_bdlkern_torch_cuda MATCHES "'([0-9]+)\\.([0-9]+)'")
      if(NOT CMAKE_MATCH_1 EQUAL CUDAToolkit_VERSION_MAJOR)
        message(FATAL_ERROR
          "bdlkern: torch was built with CUDA ${CMAKE_MATCH_1}.${CMAKE_MATCH_2} but the CUDA "
          "toolkit found is ${CUDAToolkit_VERSION} (${CUDAToolkit_BIN_DIR}); the major versions "
          "must match. Select another toolkit with -DCMAKE_CUDA_COMPILER=/path/to/bin/nvcc.")
      endif()
    endif()
    unset(_bdlkern_torch_cuda)
  endif()
endmacro()
