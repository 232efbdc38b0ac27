#include "parallel/process_grid.h"

#include <mpi.h>

#include <fmt/format.h>

#include <cstdlib>
#include <exception>
#include <mutex>

#include "parallel/error_check.h"

#ifdef SSA_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace ssa::parallel {
namespace {

// Slurm's task counts: of the srun step this process belongs to, else of the job.
constexpr const char* kSlurmStepTasksEnv = "SLURM_STEP_NUM_TASKS";
constexpr const char* kSlurmTasksEnv = "SLURM_NTASKS";

// MPI is called from the main thread, and on CPU also from autograd's backward
// of the ring attention, which LibTorch runs on the thread that called
// backward(): never from two threads at once, so SERIALIZED is enough.
constexpr int kThreadLevel = MPI_THREAD_SERIALIZED;

std::mutex g_mutex;
int g_live_grids = 0;        // grids alive and not finalised
bool g_owns_mpi = false;     // a grid called MPI_Init_thread

void finalize_mpi_if_last() {
  if (g_live_grids == 0 && g_owns_mpi) {
    g_owns_mpi = false;
    SSA_MPI_CHECK(MPI_Finalize());
  }
}

}  // namespace

struct ProcessGrid::State {
  int rank = 0, world = 1, dp = 1, cp = 1, dp_rank = 0, cp_rank = 0;
  int local_rank = 0, local_size = 1, thread_level = MPI_THREAD_SINGLE;
  bool cp_one_host = true;
  std::string host;
  std::unique_ptr<Communicator> world_comm, dp_comm, cp_comm;
  bool finalized = false;
};

ProcessGrid::ProcessGrid(std::unique_ptr<State> state) : state_(std::move(state)) {}
ProcessGrid::ProcessGrid(ProcessGrid&&) noexcept = default;
ProcessGrid& ProcessGrid::operator=(ProcessGrid&& other) noexcept {
  if (this != &other) {
    finalize();
    state_ = std::move(other.state_);
  }
  return *this;
}
ProcessGrid::~ProcessGrid() {
  try {
    if (std::uncaught_exceptions() > 0) {
      abandon();
    } else {
      finalize();
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "{}: finalising the process grid: {}\n", process_location(), e.what());
  }
}

void ProcessGrid::abandon() {
  if (!state_ || state_->finalized) return;
  state_->finalized = true;
  // An error is propagating on this rank while the others may wait in a
  // collective: MPI_Finalize (or ncclCommDestroy) could block forever. The
  // process exits without finalising; mpirun and srun --mpi=pmix then end the
  // whole job instead of leaving it hanging.
  for (auto* c : {state_->cp_comm.get(), state_->dp_comm.get(), state_->world_comm.get()}) {
    if (c) c->abandon();
  }
  state_->cp_comm.reset();  // abandoned: the destructors free nothing
  state_->dp_comm.reset();
  state_->world_comm.reset();
  std::lock_guard<std::mutex> lock(g_mutex);
  --g_live_grids;
}

ProcessGrid ProcessGrid::init(int64_t dp, int64_t cp) {
  if (dp < 0 || cp < 1) {
    throw GridError(fmt::format("parallel.dp = {} and parallel.cp = {}: cp must be >= 1 and dp >= 1 (or 0: world / cp)",
                                dp, cp));
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  int initialized = 0, finalized = 0;
  SSA_MPI_CHECK(MPI_Initialized(&initialized));
  SSA_MPI_CHECK(MPI_Finalized(&finalized));
  if (finalized) {
    throw GridError(fmt::format("{}: MPI was already finalised in this process; it cannot be initialised again",
                                process_location()));
  }
  auto state = std::make_unique<State>();
  if (!initialized) {
    SSA_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, kThreadLevel, &state->thread_level));
    g_owns_mpi = true;
  } else {
    SSA_MPI_CHECK(MPI_Query_thread(&state->thread_level));
  }
  SSA_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  SSA_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &state->rank));
  SSA_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &state->world));

  // Launch checks; each rank reaches the same verdict, so all throw together.
  std::string problem;
  const char* step_tasks = std::getenv(kSlurmStepTasksEnv);
  const char* job_tasks = std::getenv(kSlurmTasksEnv);
  const char* slurm_name = step_tasks ? kSlurmStepTasksEnv : kSlurmTasksEnv;
  const char* slurm_value = step_tasks ? step_tasks : job_tasks;
  if (slurm_value && std::atoi(slurm_value) > 0 && std::atoi(slurm_value) != state->world) {
    problem = fmt::format(
        "MPI world size is {} but Slurm runs {} tasks ({}={}): start one MPI rank per task with "
        "`srun --mpi=pmix ...` (a bare command in the batch script is one process, and srun without --mpi=pmix "
        "starts independent single-rank processes)",
        state->world, slurm_value, slurm_name, slurm_value);
  } else if (dp == 0 && state->world % cp != 0) {
    problem = fmt::format("parallel.cp ({}) must divide the number of MPI ranks ({}) when parallel.dp is inferred",
                          cp, state->world);
  } else if (dp != 0 && dp * cp != state->world) {
    problem = fmt::format(
        "parallel.dp ({}) x parallel.cp ({}) = {} must equal the number of MPI ranks ({}): start {} ranks "
        "(mpirun -np {} / srun -n {}) or change parallel.dp / parallel.cp",
        dp, cp, dp * cp, state->world, dp * cp, dp * cp, dp * cp);
  } else if (state->thread_level < MPI_THREAD_FUNNELED) {
    problem = fmt::format("MPI provides thread level {}; at least MPI_THREAD_FUNNELED is needed", state->thread_level);
  }
  if (!problem.empty()) {
    const std::string where = process_location();
    finalize_mpi_if_last();
    throw GridError(fmt::format("{}: {}", where, problem));
  }

  state->dp = static_cast<int>(dp == 0 ? state->world / cp : dp);
  state->cp = static_cast<int>(cp);
  state->dp_rank = state->rank / state->cp;
  state->cp_rank = state->rank % state->cp;

  MPI_Comm local = MPI_COMM_NULL;
  SSA_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, state->rank, MPI_INFO_NULL, &local));
  SSA_MPI_CHECK(MPI_Comm_rank(local, &state->local_rank));
  SSA_MPI_CHECK(MPI_Comm_size(local, &state->local_size));
  SSA_MPI_CHECK(MPI_Comm_free(&local));

  char name[MPI_MAX_PROCESSOR_NAME] = {0};
  int name_length = 0;
  SSA_MPI_CHECK(MPI_Get_processor_name(name, &name_length));
  state->host.assign(name, static_cast<size_t>(name_length));

  MPI_Comm world = MPI_COMM_NULL, dp_comm = MPI_COMM_NULL, cp_comm = MPI_COMM_NULL;
  SSA_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &world));
  state->world_comm = std::make_unique<Communicator>(world, "world");
  SSA_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, state->cp_rank, state->dp_rank, &dp_comm));
  state->dp_comm = std::make_unique<Communicator>(dp_comm, "dp");
  SSA_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, state->dp_rank, state->cp_rank, &cp_comm));
  state->cp_comm = std::make_unique<Communicator>(cp_comm, "cp");

  MPI_Comm cp_local = MPI_COMM_NULL;
  int cp_local_size = 0;
  SSA_MPI_CHECK(MPI_Comm_split_type(cp_comm, MPI_COMM_TYPE_SHARED, state->cp_rank, MPI_INFO_NULL, &cp_local));
  SSA_MPI_CHECK(MPI_Comm_size(cp_local, &cp_local_size));
  SSA_MPI_CHECK(MPI_Comm_free(&cp_local));
  state->cp_one_host = cp_local_size == state->cp;

  ++g_live_grids;
  return ProcessGrid(std::move(state));
}

ProcessGrid::State& ProcessGrid::state() const {
  if (!state_ || state_->finalized) {
    throw GridError("parallel::ProcessGrid used after finalize() or after being moved from");
  }
  return *state_;
}

int64_t ProcessGrid::rank() const { return state().rank; }
int64_t ProcessGrid::world_size() const { return state().world; }
int64_t ProcessGrid::dp_rank() const { return state().dp_rank; }
int64_t ProcessGrid::cp_rank() const { return state().cp_rank; }
int64_t ProcessGrid::dp() const { return state().dp; }
int64_t ProcessGrid::cp() const { return state().cp; }
int64_t ProcessGrid::local_rank() const { return state().local_rank; }
int64_t ProcessGrid::local_size() const { return state().local_size; }
const std::string& ProcessGrid::host() const { return state().host; }
int ProcessGrid::thread_level() const { return state().thread_level; }
bool ProcessGrid::cp_group_on_one_host() const { return state().cp_one_host; }
Communicator& ProcessGrid::world() { return *state().world_comm; }
Communicator& ProcessGrid::dp_group() { return *state().dp_comm; }
Communicator& ProcessGrid::cp_group() { return *state().cp_comm; }

std::string ProcessGrid::describe() const {
  const State& s = state();
  return fmt::format("rank {}/{} (dp {}/{}, cp {}/{}) local {}/{} on host {}", s.rank, s.world, s.dp_rank, s.dp,
                     s.cp_rank, s.cp, s.local_rank, s.local_size, s.host);
}

at::Device ProcessGrid::bind_device(at::DeviceType type) {
  [[maybe_unused]] State& s = state();
  if (type == at::kCPU) return at::Device(at::kCPU);
  if (type != at::kCUDA) {
    throw GridError(fmt::format("{}: cannot bind to device type {} (cpu or cuda)", describe(), c10::toString(type)));
  }
#ifdef SSA_WITH_CUDA
  const int visible = static_cast<int>(c10::cuda::device_count());
  int device = -1;
  if (visible >= s.local_size) {
    device = s.local_rank;  // one GPU per local rank
  } else if (visible == 1) {
    device = 0;  // each task sees only its own GPU (e.g. srun --gpus-per-task=1)
  } else {
    throw GridError(fmt::format("{}: host {} runs {} ranks but sees {} GPUs; launch one task per GPU", describe(),
                                s.host, s.local_size, visible));
  }
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
  const at::Device dev(at::kCUDA, static_cast<c10::DeviceIndex>(device));
  s.world_comm->ensure_device(dev);
  s.dp_comm->ensure_device(dev);
  s.cp_comm->ensure_device(dev);
  return dev;
#else
  throw GridError(fmt::format("{}: CUDA was asked for, but this build has no CUDA runtime (configure with "
                              "SSA_CUDA_RUNTIME=ON on a GPU host)",
                              describe()));
#endif
}

std::map<std::string, double> ProcessGrid::comm_seconds() {
  State& s = state();
  std::map<std::string, double> all;
  for (Communicator* c : {s.world_comm.get(), s.dp_comm.get(), s.cp_comm.get()}) {
    for (const auto& [op, seconds] : c->comm_seconds()) all[op] += seconds;
  }
  return all;
}

std::map<std::string, int64_t> ProcessGrid::comm_bytes() const {
  const State& s = state();
  std::map<std::string, int64_t> all;
  for (const Communicator* c : {s.world_comm.get(), s.dp_comm.get(), s.cp_comm.get()}) {
    for (const auto& [op, bytes] : c->comm_bytes()) all[op] += bytes;
  }
  return all;
}

void ProcessGrid::finalize() {
  if (!state_ || state_->finalized) return;
  state_->finalized = true;
  state_->cp_comm.reset();
  state_->dp_comm.reset();
  state_->world_comm.reset();
  std::lock_guard<std::mutex> lock(g_mutex);
  --g_live_grids;
  finalize_mpi_if_last();
}

}  // namespace ssa::parallel
