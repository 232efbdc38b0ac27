# Every third-party dependency, found once and exposed as an imported target.
find_package(Threads REQUIRED)
find_package(ZLIB REQUIRED)
find_package(HDF5 REQUIRED COMPONENTS C)
find_package(MPI REQUIRED COMPONENTS CXX)
find_package(yaml-cpp REQUIRED)
find_package(CLI11 CONFIG REQUIRED)
find_package(nlohmann_json 3 REQUIRED)
find_package(prometheus-cpp CONFIG REQUIRED COMPONENTS pull)
find_package(GTest REQUIRED)

add_library(ssa_hdf5 INTERFACE)
target_include_directories(ssa_hdf5 SYSTEM INTERFACE ${HDF5_C_INCLUDE_DIRS} ${HDF5_INCLUDE_DIRS})
target_link_libraries(ssa_hdf5 INTERFACE ${HDF5_C_LIBRARIES} ${HDF5_LIBRARIES})
target_compile_definitions(ssa_hdf5 INTERFACE ${HDF5_C_DEFINITIONS} H5_USE_110_API)

include(cmake/Torch.cmake)

# fmt: LibTorch ships fmt 12 headers in its include folder, which shadow any
# system fmt; linking the system libfmt 9 against them fails. So the whole
# build uses LibTorch's fmt, header-only, also in targets that need no torch.
add_library(ssa_fmt INTERFACE)
target_include_directories(ssa_fmt SYSTEM INTERFACE ${SSA_TORCH_INCLUDE_DIR})
target_compile_definitions(ssa_fmt INTERFACE FMT_HEADER_ONLY=1)
