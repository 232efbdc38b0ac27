#pragma once
// `ssa train`: the training loop of one rank of the process grid. Resumes from
// <run>/checkpoints/latest when it exists; checkpoints every checkpoint.every
// steps and at the end; stops with a checkpoint when preemption is signalled.
#include <filesystem>

#include "core/config.h"

namespace ssa::core {

enum class TrainOutcome {
  kFinished,   // reached train.steps
  kPaused,     // stopped after TrainLimits::stop_after_steps, with a checkpoint
  kPreempted,  // SIGUSR1/SIGTERM: checkpointed, the job should be requeued
};

struct TrainLimits {
  // Steps to run in this invocation before checkpointing and returning (< 0: no
  // limit). The schedule still spans train.steps, so pausing and resuming trains
  // exactly like one uninterrupted run (time-sliced jobs, tests).
  int64_t stop_after_steps = -1;
};

// Throws ConfigError for an invalid or incompatible (resumed) config and
// std::runtime_error for data, checkpoint or numerical failures.
TrainOutcome run_training(Config config, const std::filesystem::path& run_dir, TrainLimits limits = {});

}  // namespace ssa::core
