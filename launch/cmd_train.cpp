#include "launch/commands.h"

namespace ssa::launch {

void add_train_command(CLI::App& app, int& exit_code) {
  auto* cmd = app.add_subcommand("train", "train (under construction)");
  cmd->callback([&exit_code] { exit_code = kExitFailure; });
}

}  // namespace ssa::launch
