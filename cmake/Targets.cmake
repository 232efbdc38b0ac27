# Helpers for the per-folder libraries and the tests.

# One precompiled header of the LibTorch headers, built once and reused by every
# target that includes torch (all compile with the same flags).
add_library(ssa_torch_pch STATIC ${PROJECT_SOURCE_DIR}/cmake/torch_pch.cpp)
target_link_libraries(ssa_torch_pch PUBLIC ssa_torch ssa_fmt ssa_warnings)
target_precompile_headers(ssa_torch_pch PRIVATE ${PROJECT_SOURCE_DIR}/cmake/torch_pch.h)

function(ssa_use_torch_pch target)
  target_link_libraries(${target} PUBLIC ssa_torch ssa_fmt)
  target_precompile_headers(${target} REUSE_FROM ssa_torch_pch)
  add_dependencies(${target} ssa_torch_pch)
endfunction()

# ssa_folder_library(NAME [TORCH] [DEPS ...]): a library of the folder's *.cpp.
function(ssa_folder_library name)
  cmake_parse_arguments(ARG "TORCH" "" "DEPS;SOURCES" ${ARGN})
  file(GLOB sources CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/*.cpp)
  if(NOT sources AND NOT ARG_SOURCES)
    set(sources ${PROJECT_SOURCE_DIR}/cmake/torch_pch.cpp)  # a folder still being written
  endif()
  add_library(${name} STATIC ${sources} ${ARG_SOURCES})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS} ssa_fmt PRIVATE ssa_warnings)
  if(ARG_TORCH)
    ssa_use_torch_pch(${name})
  endif()
endfunction()
