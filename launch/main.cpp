// ssa: SSA (Sparse Sparse Attention) long-context training.
#include <fmt/format.h>

#include <exception>

#include "launch/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"ssa-train: long-context LLM training with SSA (full + block-sparse attention, aligned)", "ssa"};
  app.require_subcommand(1);
  int exit_code = ssa::launch::kExitOk;
  ssa::launch::add_train_command(app, exit_code);
  ssa::launch::add_data_command(app, exit_code);
  ssa::launch::add_eval_command(app, exit_code);
  ssa::launch::add_attn_command(app, exit_code);
  ssa::launch::add_report_command(app, exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const ssa::core::ConfigError& e) {
    fmt::print(stderr, "ssa: error: {}\n", e.what());
    return ssa::launch::kExitBadConfig;
  } catch (const std::exception& e) {
    fmt::print(stderr, "ssa: error: {}\n", e.what());
    return ssa::launch::kExitFailure;
  }
  return exit_code;
}
