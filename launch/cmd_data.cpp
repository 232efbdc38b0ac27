// `ssa data`: prepare (text -> token shards), inspect (summary + full
// validation), bench (reader throughput on this machine).
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "data/dataset_inspect.h"
#include "data/dataset_prepare.h"
#include "data/reader_bench.h"
#include "launch/commands.h"

namespace ssa::launch {

namespace {

namespace fs = std::filesystem;

double megabytes(int64_t bytes) { return static_cast<double>(bytes) / 1e6; }

// One status line on stderr: redrawn in place on a terminal, else printed
// every few seconds so logs stay short.
class PrepareProgressLine {
 public:
  PrepareProgressLine() : terminal_(isatty(fileno(stderr)) != 0), started_(Clock::now()), last_(started_) {}

  void update(const data::PrepareProgress& p) {
    auto now = Clock::now();
    double since_last = std::chrono::duration<double>(now - last_).count();
    if (!p.done && since_last < (terminal_ ? 0.2 : 5.0)) return;
    last_ = now;
    double elapsed = std::chrono::duration<double>(now - started_).count();
    std::string percent =
        p.total_bytes > 0 ? fmt::format(" {:3.0f}%", 100.0 * static_cast<double>(p.bytes) / p.total_bytes) : "";
    std::string line = fmt::format("prepare [{}/{} {}]{} {:.1f} MB read, {} docs, {} tokens, {} shards, {:.1f} s",
                                   p.pass, p.passes, p.pass < p.passes ? "counting documents" : "writing shards",
                                   percent, megabytes(p.bytes), p.documents, p.tokens, p.shards, elapsed);
    if (terminal_) {
      fmt::print(stderr, "\r{:<110}{}", line, p.done ? "\n" : "");
    } else {
      fmt::print(stderr, "{}\n", line);
    }
    std::fflush(stderr);
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool terminal_;
  Clock::time_point started_, last_;
};

void add_prepare(CLI::App& data, int& exit_code) {
  struct Args {
    data::PrepareOptions options;
    std::string split = "auto";
    bool uint32 = false;
    bool quiet = false;
  };
  auto args = std::make_shared<Args>();
  auto* cmd = data.add_subcommand("prepare", "Tokenize text files (plain or gzip) into HDF5 token shards (byte tokenizer)");
  cmd->add_option("-i,--input", args->options.inputs, "input files or folders (folders: every file below, sorted)")
      ->required()
      ->expected(1, -1);
  cmd->add_option("-o,--output", args->options.output, "dataset folder to write (val split goes to OUTPUT/val)")
      ->required();
  cmd->add_option("--split", args->split,
                  "what a document is: file (one per input file), blank-lines (runs of blank lines separate "
                  "documents), dict (dictd entries: a line starting at column 0 starts a document), auto (dict "
                  "for *.dict and *.dict.dz, else file)")
      ->check(CLI::IsMember({"auto", "file", "blank-lines", "dict"}))
      ->capture_default_str();
  cmd->add_option("--val-fraction", args->options.val_fraction,
                  "share of documents (the last ones) written to OUTPUT/val for eval")
      ->check(CLI::Range(0.0, 0.999999))
      ->capture_default_str();
  cmd->add_option("--shard-tokens", args->options.shard_tokens, "tokens per shard")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--chunk-tokens", args->options.chunk_tokens, "HDF5 chunk length of /tokens")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--deflate", args->options.deflate_level,
                  "deflate level 1-9 (0: none; compressed shards are smaller but much slower to sample from)")
      ->check(CLI::Range(0, 9))
      ->capture_default_str();
  cmd->add_flag("--uint32", args->uint32, "store token ids as uint32 (default uint16, which fits the byte vocabulary)");
  cmd->add_flag("--overwrite", args->options.overwrite, "replace shards already in the output folder");
  cmd->add_flag("-q,--quiet", args->quiet, "no progress line");
  cmd->callback([args, &exit_code] {
    args->options.split = data::parse_split_mode(args->split);
    args->options.token_bytes = args->uint32 ? 4 : 0;
    PrepareProgressLine line;
    std::function<void(const data::PrepareProgress&)> progress;
    if (!args->quiet) progress = [&line](const data::PrepareProgress& p) { line.update(p); };
    data::PrepareSummary s = data::prepare_dataset(args->options, progress);
    fmt::print("prepared {} from {} file(s), {:.1f} MB of text, in {:.2f} s ({:.1f} MB/s)\n", args->options.output,
               s.files.size(), megabytes(s.input_bytes), s.seconds, megabytes(s.input_bytes) / s.seconds);
    fmt::print("  train: {} documents, {} tokens, {} shard(s) in {}\n", s.train_documents, s.train_tokens,
               s.train_shards.size(), args->options.output);
    if (!s.val_shards.empty()) {
      fmt::print("  val:   {} documents, {} tokens, {} shard(s) in {}\n", s.val_documents, s.val_tokens,
                 s.val_shards.size(), (fs::path(args->options.output) / "val").string());
    }
    exit_code = kExitOk;
  });
}

// Prints the report; returns whether the dataset is valid.
bool print_inspect_report(const data::InspectReport& report) {
  fmt::print("dataset {}: {} shard(s)\n", report.dir, report.shards.size());
  if (!report.shards.empty()) {
    fmt::print("  {:<24} {:>12} {:>9} {:>6} {:>9} {:<18} {:>9} {:>7} {:>9}  {}\n", "shard", "tokens", "docs", "type",
               "chunk", "filters", "MB", "max id", "eos", "check");
  }
  for (const auto& shard : report.shards) {
    const data::ShardMeta& m = shard.meta;
    std::string name = fs::path(m.path).filename().string();
    if (m.vocab_size == 0) {
      fmt::print("  {:<24} {}\n", name, "FAILED (see below)");
      continue;
    }
    fmt::print("  {:<24} {:>12} {:>9} {:>6} {:>9} {:<18} {:>9.2f} {:>7} {:>9}  {}\n", name, m.n_tokens, m.n_docs,
               m.token_bytes == 2 ? "uint16" : "uint32", m.chunk_tokens, m.filters, megabytes(m.file_bytes),
               shard.max_token, shard.eos_tokens, shard.problem.empty() ? "ok" : "FAILED");
  }
  if (!report.shards.empty()) {
    const data::ShardMeta* first = nullptr;
    for (const auto& shard : report.shards) {
      if (shard.meta.vocab_size != 0) {
        first = &shard.meta;
        break;
      }
    }
    fmt::print("  total: {} tokens, {} documents, {:.2f} MB", report.total_tokens, report.total_documents,
               megabytes(report.total_file_bytes));
    if (first != nullptr) {
      fmt::print("; format {} version {}, vocab_size {}, eos_id {}, tokenizer \"{}\"", "ssa-tokens", first->version,
                 first->vocab_size, first->eos_id, first->tokenizer);
    }
    fmt::print("\n");
  }
  if (report.ok()) {
    fmt::print("  valid: format and version, shards agree, doc offsets increasing and in range, every token id < "
               "vocab_size\n");
    return true;
  }
  for (const auto& problem : report.problems) fmt::print(stderr, "ssa: error: {}\n", problem);
  fmt::print(stderr, "ssa: dataset {} is INVALID: {} problem(s)\n", report.dir, report.problems.size());
  return false;
}

void add_inspect(CLI::App& data, int& exit_code) {
  auto dirs = std::make_shared<std::vector<std::string>>();
  auto* cmd = data.add_subcommand("inspect", "Summarize and fully validate token shard folders (exit 1 if invalid)");
  cmd->add_option("dir", *dirs, "dataset folders")->required()->expected(1, -1);
  cmd->callback([dirs, &exit_code] {
    bool all_ok = true;
    for (const auto& dir : *dirs) {
      all_ok = print_inspect_report(data::inspect_dataset(dir)) && all_ok;
      // prepare --val-fraction writes a second dataset below the first.
      fs::path val = fs::path(dir) / "val";
      std::error_code error;
      if (fs::is_directory(val, error) && std::find(dirs->begin(), dirs->end(), val.string()) == dirs->end()) {
        fmt::print("  (held-out data in {}: add it to the command line to check it too)\n", val.string());
      }
    }
    exit_code = all_ok ? kExitOk : kExitFailure;
  });
}

void add_bench(CLI::App& data, int& exit_code) {
  auto options = std::make_shared<data::BenchOptions>();
  auto* cmd = data.add_subcommand("bench", "Measure the token reader's throughput and the consumer's wait time");
  cmd->add_option("dir", options->dir, "dataset folder")->required();
  cmd->add_option("--seq-len", options->seq_len, "S: inputs per sample")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--batch", options->global_batch, "global batch (samples per step over all dp ranks)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--steps", options->steps, "batches to read")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--dp", options->dp_size, "dp size (rank 0 is measured)")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--cp", options->cp_size, "cp size (rank 0 is measured)")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--prefetch", options->prefetch, "batches queued ahead")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--seed", options->seed, "sample order seed")->capture_default_str();
  cmd->add_option("--consumer-ms", options->consumer_ms, "simulated work per step (shows prefetch hiding I/O)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->callback([options, &exit_code] {
    const data::BenchOptions& o = *options;
    data::BenchResult r = data::run_reader_bench(o);
    fmt::print("bench {}: {} tokens, {} samples of {}+1 tokens per epoch\n", o.dir, r.total_tokens,
               r.samples_per_epoch, o.seq_len);
    fmt::print("  setup: seq_len {}, global batch {}, dp {} and cp {} (rank 0 of each measured), prefetch {}, one I/O "
               "thread, consumer work {} ms/step\n",
               o.seq_len, o.global_batch, o.dp_size, o.cp_size, o.prefetch, o.consumer_ms);
    fmt::print("  baseline (one sequential pass, 1M-token reads of the same shards): {} tokens in {:.3f} s = {:.1f} M "
               "tokens/s\n",
               r.baseline_tokens, r.baseline_seconds, r.baseline_tokens_per_second() / 1e6);
    fmt::print("  reader: {} steps, {} tokens in {:.3f} s = {:.1f} M tokens/s ({:.2f} x baseline), reader open {:.3f} s, "
               "{} epoch(s) touched\n",
               r.steps, r.tokens, r.seconds, r.tokens_per_second() / 1e6,
               r.tokens_per_second() / std::max(r.baseline_tokens_per_second(), 1e-9), r.open_seconds,
               r.epochs_touched);
    fmt::print("  consumer waited {:.3f} s in next() ({:.1f}% of the run; {:.3f} ms per step, longest {:.3f} ms)\n",
               r.wait_seconds, 100.0 * r.wait_seconds / std::max(r.seconds, 1e-9), 1e3 * r.wait_seconds / r.steps,
               1e3 * r.max_wait_seconds);
    fmt::print("  checksum {}\n", r.checksum);
    exit_code = kExitOk;
  });
}

}  // namespace

void add_data_command(CLI::App& app, int& exit_code) {
  auto* cmd = app.add_subcommand("data", "Token shards: prepare from text, inspect/validate, bench the reader");
  cmd->require_subcommand(1);
  add_prepare(*cmd, exit_code);
  add_inspect(*cmd, exit_code);
  add_bench(*cmd, exit_code);
}

}  // namespace ssa::launch
