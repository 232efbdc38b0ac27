#include "parallel/preemption.h"

#include <fmt/format.h>

#include <atomic>
#include <csignal>
#include <cstring>

#include "parallel/error_check.h"

namespace ssa::parallel {
namespace {

// Written by the handler: lock-free, so async-signal-safe.
std::atomic<int> g_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the preemption flag must be lock-free for a signal handler");

extern "C" void on_preemption_signal(int signal_number) { g_signal.store(signal_number, std::memory_order_relaxed); }

}  // namespace

void install_preemption_handlers() {
  struct sigaction action;
  std::memset(&action, 0, sizeof(action));
  action.sa_handler = on_preemption_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // blocking I/O in other code resumes instead of failing with EINTR
  for (int s : {SIGUSR1, SIGTERM}) {
    if (sigaction(s, &action, nullptr) != 0) {
      throw CommError(fmt::format("{}: sigaction({}) failed: {}", process_location(), s, std::strerror(errno)));
    }
  }
}

int preemption_signal() { return g_signal.load(std::memory_order_relaxed); }
bool preemption_requested() { return preemption_signal() != 0; }
void clear_preemption_flag() { g_signal.store(0, std::memory_order_relaxed); }

bool preemption_agreed(Communicator& world) {
  at::Tensor flag = at::full({1}, preemption_requested() ? 1 : 0, at::TensorOptions().dtype(at::kInt));
  world.all_reduce(flag, ReduceOp::kMax);
  return flag.item<int>() != 0;
}

}  // namespace ssa::parallel
