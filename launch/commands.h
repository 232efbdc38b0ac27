#pragma once
// The `ssa` subcommands. Each add_*_command registers its subcommand on the app;
// the subcommand's callback runs the work and stores the process exit code.
#include <CLI/CLI.hpp>

#include "core/config.h"

namespace ssa::launch {

// Exit codes of the `ssa` binary.
constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;
constexpr int kExitBadConfig = 2;  // a ConfigError: bad key, type, value or combination
constexpr int kExitRequeue = 3;    // checkpointed after SIGUSR1/SIGTERM: requeue the job

// --config / --set options shared by train and eval.
struct ConfigOptions {
  std::string file;                   // empty: the built-in defaults (configs/tiny.yaml)
  std::vector<std::string> overrides;  // section.key=value, applied in order
  void add_to(CLI::App& command);
  // Loads file (or defaults), applies overrides, validates. Throws ConfigError.
  core::Config resolve() const;
};

void add_train_command(CLI::App& app, int& exit_code);
void add_data_command(CLI::App& app, int& exit_code);
void add_eval_command(CLI::App& app, int& exit_code);
void add_attn_command(CLI::App& app, int& exit_code);
void add_report_command(CLI::App& app, int& exit_code);

}  // namespace ssa::launch
