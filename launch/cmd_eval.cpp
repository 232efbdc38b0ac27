#include <fmt/format.h>

#include <filesystem>

#include "core/checkpoint.h"
#include "core/eval.h"
#include "launch/commands.h"

namespace ssa::launch {

void add_eval_command(CLI::App& app, int& exit_code) {
  auto* cmd = app.add_subcommand(
      "eval", "perplexity under full and sparse inference, attention sparsity and entropy of a trained model");
  struct Args {
    ConfigOptions config;
    std::string run_dir = "runs/default";
    std::string checkpoint;
    std::string json_out;
  };
  auto args = std::make_shared<Args>();
  args->config.add_to(*cmd);
  cmd->add_option("-r,--run-dir", args->run_dir, "run folder whose latest checkpoint is evaluated")->capture_default_str();
  cmd->add_option("--checkpoint", args->checkpoint, "a checkpoint step folder (instead of the run's latest)");
  cmd->add_option("--json", args->json_out, "write the results as JSON here (default: <run-dir>/eval.json)");
  cmd->callback([args, &exit_code] {
    core::Config config = args->config.resolve();
    std::filesystem::path checkpoint = args->checkpoint;
    if (checkpoint.empty()) {
      auto latest = core::CheckpointDir(args->run_dir).latest();
      if (!latest)
        throw std::runtime_error(fmt::format("run folder '{}' has no checkpoint (checkpoints/latest) to evaluate",
                                             args->run_dir));
      checkpoint = *latest;
    }
    const auto report = core::run_eval(config, checkpoint);
    fmt::print("eval of {}\n{}", report.checkpoint, report.to_table());
    const std::filesystem::path out =
        args->json_out.empty() ? std::filesystem::path(args->run_dir) / "eval.json" : std::filesystem::path(args->json_out);
    if (out.has_parent_path()) std::filesystem::create_directories(out.parent_path());
    core::write_text_file_synced(out, report.to_json());
    fmt::print("results: {}\n", out.string());
    exit_code = kExitOk;
  });
}

}  // namespace ssa::launch
