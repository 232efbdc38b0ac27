#pragma once
// What a checkpoint holds beyond the files of tensors: the run's position
// (step, tokens, data cursor, skipped steps), the grid it was written on and the
// resolved config; and the rule for which config changes a resume accepts.
#include <cstdint>
#include <string>

#include "core/config.h"

namespace ssa::core {

struct RunState {
  int64_t step = 0;           // optimizer steps completed
  int64_t tokens_seen = 0;    // over all ranks
  int64_t data_step = 0;      // reader cursor: global batches consumed
  int64_t skipped_steps = 0;  // NaN/Inf steps skipped so far
  int64_t dp = 1, cp = 1;     // grid the checkpoint was written on
  uint64_t seed = 0;          // mode draws are a hash of (seed, step, micro-batch, replica): no RNG stream to save
  std::string config_json;    // resolved config of the run that wrote it
};

std::string run_state_to_json(const RunState& state);
RunState run_state_from_json(const std::string& text, const std::string& origin);

// Throws ConfigError naming the first key whose change would make the resumed
// run a different run (model shape, sequence length, global batch, seed, data,
// block size). Other keys (steps, lr schedule, dp/cp, monitoring ...) may change.
void check_resume_compatible(Config& saved, Config& requested, const std::string& checkpoint);

}  // namespace ssa::core
