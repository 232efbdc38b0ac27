#include "parallel/error_check.h"

#include <mpi.h>
#include <unistd.h>

#include <fmt/format.h>

namespace ssa::parallel {

std::string process_location() {
  char host[256] = "?";
  if (gethostname(host, sizeof(host)) != 0) host[0] = '?', host[1] = '\0';
  host[sizeof(host) - 1] = '\0';
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  std::string rank = "?";
  if (initialized && !finalized) {
    int r = -1, n = 0;
    if (MPI_Comm_rank(MPI_COMM_WORLD, &r) == MPI_SUCCESS && MPI_Comm_size(MPI_COMM_WORLD, &n) == MPI_SUCCESS) {
      rank = fmt::format("{}/{}", r, n);
    }
  }
  return fmt::format("rank {} on host {} (pid {})", rank, host, static_cast<long>(getpid()));
}

void throw_call_failure(const char* library, const char* call, const std::string& detail, const char* file,
                        int line) {
  throw CommError(fmt::format("{}: {} call `{}` failed: {} ({}:{})", process_location(), library, call, detail, file,
                              line));
}

void check_mpi(int code, const char* call, const char* file, int line) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {0};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  throw_call_failure("MPI", call, fmt::format("error {}: {}", code, std::string(text, static_cast<size_t>(length))),
                     file, line);
}

#ifdef SSA_WITH_CUDA
void check_nccl(ncclResult_t code, const char* call, const char* file, int line) {
  if (code == ncclSuccess) return;
  const char* last = ncclGetLastError(nullptr);
  throw_call_failure("NCCL", call,
                     fmt::format("error {}: {}{}{}", static_cast<int>(code), ncclGetErrorString(code),
                                 last && *last ? "; " : "", last ? last : ""),
                     file, line);
}

void check_cuda(cudaError_t code, const char* call, const char* file, int line) {
  if (code == cudaSuccess) return;
  throw_call_failure("CUDA", call, fmt::format("error {}: {}", static_cast<int>(code), cudaGetErrorString(code)),
                     file, line);
}
#endif

}  // namespace ssa::parallel
