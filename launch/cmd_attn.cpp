#include "launch/commands.h"

namespace ssa::launch {

void add_attn_command(CLI::App& app, int& exit_code) {
  auto* cmd = app.add_subcommand("attn", "attn (under construction)");
  cmd->callback([&exit_code] { exit_code = kExitFailure; });
}

}  // namespace ssa::launch
