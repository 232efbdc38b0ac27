# ssa_torch: LibTorch from the torch wheel (CMAKE_PREFIX_PATH points at
# torch.utils.cmake_prefix_path).
#
# CPU builds link libtorch_cpu and libc10 only, without TorchConfig: the wheel's
# TorchConfig pulls in the CUDA, cuDNN and NCCL libraries, which a CPU machine
# neither has nor needs. With SSA_CUDA_RUNTIME the full TorchConfig is used.
find_path(SSA_TORCH_INCLUDE_DIR torch/csrc/api/include/torch/types.h
  PATH_SUFFIXES ../../include ../../../include include
  HINTS ${CMAKE_PREFIX_PATH} REQUIRED NO_DEFAULT_PATH)
get_filename_component(SSA_TORCH_INCLUDE_DIR "${SSA_TORCH_INCLUDE_DIR}" ABSOLUTE)
get_filename_component(SSA_TORCH_LIB_DIR "${SSA_TORCH_INCLUDE_DIR}/../lib" ABSOLUTE)

add_library(ssa_torch INTERFACE)
if(SSA_CUDA_RUNTIME)
  # 9.0a: wgmma and the tensor memory accelerator need the arch-specific target.
  set(TORCH_CUDA_ARCH_LIST 9.0a CACHE STRING "")
  find_package(Torch REQUIRED)
  target_link_libraries(ssa_torch INTERFACE ${TORCH_LIBRARIES})
  target_include_directories(ssa_torch SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
  target_compile_definitions(ssa_torch INTERFACE SSA_WITH_CUDA=1)
else()
  find_library(SSA_TORCH_CPU_LIB torch_cpu PATHS ${SSA_TORCH_LIB_DIR} REQUIRED NO_DEFAULT_PATH)
  find_library(SSA_C10_LIB c10 PATHS ${SSA_TORCH_LIB_DIR} REQUIRED NO_DEFAULT_PATH)
  target_link_libraries(ssa_torch INTERFACE ${SSA_TORCH_CPU_LIB} ${SSA_C10_LIB} Threads::Threads)
  target_include_directories(ssa_torch SYSTEM INTERFACE
    ${SSA_TORCH_INCLUDE_DIR} ${SSA_TORCH_INCLUDE_DIR}/torch/csrc/api/include)
  target_compile_definitions(ssa_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
endif()
set(CMAKE_BUILD_RPATH ${SSA_TORCH_LIB_DIR} ${SSA_EXTRA_RPATH})
set(CMAKE_INSTALL_RPATH ${SSA_TORCH_LIB_DIR} ${SSA_EXTRA_RPATH})
# RUNPATH is not followed for indirect dependencies (libtorch_cpu -> libcudart);
# plain RPATH is.
add_link_options(-Wl,--disable-new-dtags)
message(STATUS "ssa: LibTorch headers ${SSA_TORCH_INCLUDE_DIR}")
