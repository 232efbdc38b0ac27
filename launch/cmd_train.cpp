#include <fmt/format.h>

#include "core/trainer.h"
#include "launch/commands.h"

namespace ssa::launch {

void add_train_command(CLI::App& app, int& exit_code) {
  auto* cmd = app.add_subcommand("train", "train a model (resumes from <run-dir>/checkpoints/latest if present)");
  struct Args {
    ConfigOptions config;
    std::string run_dir = "runs/default";
    int64_t stop_after = -1;
  };
  auto args = std::make_shared<Args>();
  args->config.add_to(*cmd);
  cmd->add_option("-r,--run-dir", args->run_dir, "run folder: checkpoints, config.json, metrics.jsonl")
      ->capture_default_str();
  cmd->add_option("--stop-after-steps", args->stop_after,
                  "checkpoint and stop after this many steps of this invocation (the schedule still spans train.steps)");
  cmd->callback([args, &exit_code] {
    core::Config config = args->config.resolve();
    core::TrainLimits limits;
    limits.stop_after_steps = args->stop_after;
    const auto outcome = core::run_training(std::move(config), args->run_dir, limits);
    exit_code = outcome == core::TrainOutcome::kPreempted ? kExitRequeue : kExitOk;
  });
}

}  // namespace ssa::launch
