# ssa_warnings: the warning set every project target compiles with.
add_library(ssa_warnings INTERFACE)
target_compile_options(ssa_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wno-unused-parameter>)
