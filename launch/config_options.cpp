#include <filesystem>

#include "launch/commands.h"

namespace ssa::launch {

void ConfigOptions::add_to(CLI::App& command) {
  command.add_option("-c,--config", file, "YAML config file (default: built-in tiny CPU config)");
  command.add_option("--set", overrides, "override one key, e.g. --set train.steps=50 (repeatable)")
      ->take_all()
      ->allow_extra_args(false);
}

core::Config ConfigOptions::resolve() const {
  core::Config config = file.empty() ? core::Config{} : core::load_config_file(file);
  for (const auto& assignment : overrides) core::apply_override(config, assignment);
  config.validate();
  return config;
}

}  // namespace ssa::launch
