#include <fmt/format.h>

#include <memory>
#include <string>
#include <vector>

#include "launch/commands.h"
#include "monitoring/run_summary.h"

namespace ssa::launch {

void add_report_command(CLI::App& app, int& exit_code) {
  auto* cmd = app.add_subcommand(
      "report", "compare runs side by side from their metrics.jsonl: step time (and its ratio to the first run), "
                "tokens/s, MFU, peak memory, communication hidden and exposed, cp bytes, losses");
  struct Args {
    std::vector<std::string> runs;
    int64_t warmup = 3;
    std::vector<int64_t> loss_steps{5, 10, 15, 20};
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("runs", args->runs, "run folders (or metrics.jsonl files); the first is the baseline")->required();
  cmd->add_option("--warmup", args->warmup, "step records left out of the medians")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_option("--loss-steps", args->loss_steps, "steps whose losses are listed")->capture_default_str();
  cmd->callback([args, &exit_code] {
    std::vector<monitoring::RunSummary> runs;
    for (const auto& run : args->runs) runs.push_back(monitoring::summarize_run(run, args->warmup));
    fmt::print("{}", monitoring::summary_table(runs, args->loss_steps));
    exit_code = kExitOk;
  });
}

}  // namespace ssa::launch
