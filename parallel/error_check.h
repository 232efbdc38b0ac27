#pragma once
// One checking macro per library whose return codes parallel/ handles (MPI,
// NCCL, CUDA). A failure throws CommError naming the rank, host, pid, the call,
// the library's own message, and the source file and line.
#include <stdexcept>
#include <string>

namespace ssa::parallel {

// A failed MPI, NCCL or CUDA call, or a collective used the wrong way.
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "rank 3/8 on host gpu-07 (pid 1234)": where this process sits. Before MPI is
// initialised (or after it is finalised) the rank reads "rank ?".
std::string process_location();

[[noreturn]] void throw_call_failure(const char* library, const char* call, const std::string& detail,
                                     const char* file, int line);

// Throws unless the MPI call returned MPI_SUCCESS (communicators use
// MPI_ERRORS_RETURN, so errors come back as codes instead of aborting).
void check_mpi(int code, const char* call, const char* file, int line);

}  // namespace ssa::parallel

#define SSA_MPI_CHECK(call) ::ssa::parallel::check_mpi((call), #call, __FILE__, __LINE__)

#ifdef SSA_WITH_CUDA
#include <cuda_runtime_api.h>
#include <nccl.h>

namespace ssa::parallel {
void check_nccl(ncclResult_t code, const char* call, const char* file, int line);
void check_cuda(cudaError_t code, const char* call, const char* file, int line);
}  // namespace ssa::parallel

#define SSA_NCCL_CHECK(call) ::ssa::parallel::check_nccl((call), #call, __FILE__, __LINE__)
#define SSA_CUDA_CHECK(call) ::ssa::parallel::check_cuda((call), #call, __FILE__, __LINE__)
#endif
