// `ssa attn check` and `ssa attn bench`: the CUDA attention kernels against the
// reference backend (errors of o, lse, dq, dk, dv and selection agreement,
// optionally written to HDF5), and timings of the sparse path against cuDNN dense
// attention. Both need a GPU and a build with the CUDA kernels.
#include <ATen/ATen.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/step_profiler.h"
#include "core/tensor_file.h"
#include "kernels/attention.h"
#include "kernels/cuda_attention.h"
#include "kernels/cuda_attention_tools.h"
#include "launch/commands.h"

#ifdef SSA_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace ssa::launch {
namespace {

struct AttnArgs {
  int64_t batch = 1;
  std::vector<int64_t> seqs;
  int64_t heads = 32, kv_heads = 2, head_dim = 64, block_size = 16, top_k = 16;
  std::string mode = "token";
  bool deterministic = false;
  uint64_t seed = 0;
};

void add_shape_options(CLI::App* cmd, AttnArgs& a) {
  cmd->add_option("--batch", a.batch, "batch size B")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--heads", a.heads, "query heads Hq")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--kv-heads", a.kv_heads, "kv heads Hkv (Hq % Hkv == 0)")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--head-dim", a.head_dim, "head dim D (64 or 128)")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--block-size", a.block_size, "key block size")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--top-k", a.top_k, "selected blocks per query")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--mode", a.mode, "selection: token (paper) or query_block")
      ->check(CLI::IsMember({"token", "query_block"}))
      ->capture_default_str();
  cmd->add_flag("--deterministic", a.deterministic, "deterministic dk/dv (no float atomics)");
}

// Both commands need the kernels and a GPU; say which is missing.
bool require_gpu(const char* what) {
#ifdef SSA_WITH_CUDA
  if (kernels::cuda::available()) return true;
  fmt::print(stderr, "ssa attn {}: no GPU visible; the CUDA kernels need one (the reference alone is not checked)\n", what);
#else
  fmt::print(stderr,
             "ssa attn {}: this build has no CUDA kernels (configure with -DSSA_CUDA_RUNTIME=ON on a machine with "
             "nvcc and a GPU)\n",
             what);
#endif
  return false;
}

#ifdef SSA_WITH_CUDA
kernels::SparseOptions options_of(const AttnArgs& a) {
  kernels::SparseOptions o;
  o.block_size = a.block_size;
  o.top_k = a.top_k;
  o.mode = kernels::parse_selection_mode(a.mode);
  o.deterministic = a.deterministic;
  return o;
}

// Reads q, k, v ([B, S, H, D] datasets named q, k, v) from an HDF5 tensor file.
std::vector<at::Tensor> read_qkv(const std::string& path) {
  at::Tensor q, k, v;
  for (const core::NamedTensor& t : core::read_tensor_file(path)) {
    if (t.name == "q") q = t.tensor;
    if (t.name == "k") k = t.tensor;
    if (t.name == "v") v = t.tensor;
  }
  if (!q.defined() || !k.defined() || !v.defined()) {
    throw std::runtime_error(fmt::format("ssa attn check: {} must hold datasets q, k and v ([B, S, H, D])", path));
  }
  if (q.dim() != 4 || k.dim() != 4 || v.sizes() != k.sizes() || q.size(1) != k.size(1)) {
    throw std::runtime_error(fmt::format(
        "ssa attn check: {}: q must be [B, S, Hq, D] and k, v [B, S, Hkv, D] with one S, got q [{}] k [{}] v [{}]",
        path, fmt::join(q.sizes(), ", "), fmt::join(k.sizes(), ", "), fmt::join(v.sizes(), ", ")));
  }
  return {q.to(at::kCUDA), k.to(at::kCUDA), v.to(at::kCUDA)};
}

int run_check(const AttnArgs& a, const std::string& input, const std::string& out_path) {
  const kernels::SparseOptions options = options_of(a);
  std::vector<std::vector<at::Tensor>> inputs;
  if (!input.empty()) {
    inputs.push_back(read_qkv(input));
  } else {
    const std::vector<int64_t> seqs = a.seqs.empty() ? std::vector<int64_t>{4096} : a.seqs;
    at::manual_seed(a.seed);
    const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
    for (int64_t s : seqs) {
      inputs.push_back({at::randn({a.batch, s, a.heads, a.head_dim}, opts),
                        at::randn({a.batch, s, a.kv_heads, a.head_dim}, opts),
                        at::randn({a.batch, s, a.kv_heads, a.head_dim}, opts)});
    }
  }
  bool all_ok = true;
  std::vector<core::NamedTensor> to_write;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor &q = inputs[i][0], &k = inputs[i][1], &v = inputs[i][2];
    fmt::print("check B={} S={} Hq={} Hkv={} D={} block={} top_k={} mode={}{}\n", q.size(0), q.size(1), q.size(2),
               k.size(2), q.size(3), options.block_size, options.top_k, a.mode,
               options.deterministic ? " deterministic" : "");
    const kernels::cuda::CheckReport r = kernels::cuda::check_against_reference(q, k, v, options, a.seed + i);
    fmt::print("  selection: {:.4f}% of rows equal the reference's; worst left-out minus kept fp64 score {:.3g} "
               "(tolerance {:.3g}): {}\n",
               100 * r.selection_agree, r.selection_gap, r.selection_tol, r.selection_ok ? "ok" : "FAIL");
    fmt::print("  {:<4} {:>12} {:>12} {:>14} {:>14} {:>10} {:>10}  {}\n", "", "max abs err", "rel err", "bf16 spread abs",
               "bf16 spread rel", "abs bound", "rel bound", "status");
    for (const kernels::cuda::TensorError& e : r.errors) {
      fmt::print("  {:<4} {:>12.3e} {:>12.3e} {:>14.3e} {:>14.3e} {:>10.3e} {:>10.3e}  {}\n", e.name, e.max_abs, e.rel,
                 e.spread_abs, e.spread_rel, e.abs_bound, e.rel_bound, e.ok ? "ok" : "FAIL");
    }
    all_ok = all_ok && r.ok;
    const std::string prefix = inputs.size() > 1 ? fmt::format("s{}.", q.size(1)) : "";
    for (const auto& [name, t] : r.tensors) {
      core::NamedTensor nt{prefix + name, t, {}};
      if (name == "q") {
        nt.attrs = {{"block_size", options.block_size}, {"top_k", options.top_k},
                    {"query_block_mode", options.mode == kernels::SelectionMode::kQueryBlock},
                    {"deterministic", options.deterministic}};
      }
      to_write.push_back(std::move(nt));
    }
  }
  if (!out_path.empty()) {
    core::write_tensor_file(out_path, to_write);
    fmt::print("wrote {} tensors to {}\n", to_write.size(), out_path);
  }
  fmt::print("{}\n", all_ok ? "check passed" : "check FAILED");
  return all_ok ? kExitOk : kExitFailure;
}

// The sparse total case (selection, forward, backward) under the LibTorch profiler:
// `iters` runs after `warmup`, each synchronised, traced into dir/seq<S>/.
void profile_sparse_total(const kernels::cuda::BenchShape& shape, int warmup, int iters, const std::string& dir) {
  const std::function<void()> step = kernels::cuda::sparse_total_step(shape);
  const std::filesystem::path run_dir = std::filesystem::path(dir) / fmt::format("seq{}", shape.seq);
  std::filesystem::create_directories(run_dir);
  core::StepProfiler profiler(warmup + 1, iters, run_dir, /*rank=*/0, /*cuda=*/true, /*print=*/false);
  for (int i = 1; i <= warmup + iters; ++i) {
    profiler.before_step(i);
    step();
    c10::cuda::device_synchronize();
    profiler.after_step(i);
  }
  fmt::print("  profile of {} sparse total runs: {}\n", iters, (run_dir / "profile-rank0.json").string());
}

int run_bench(const AttnArgs& a, int warmup, int iters, const std::string& profile_dir) {
  const std::vector<int64_t> seqs = a.seqs.empty() ? std::vector<int64_t>{8192, 32768} : a.seqs;
  for (int64_t s : seqs) {
    kernels::cuda::BenchShape shape;
    shape.batch = a.batch;
    shape.seq = s;
    shape.heads = a.heads;
    shape.kv_heads = a.kv_heads;
    shape.head_dim = a.head_dim;
    shape.options = options_of(a);
    const kernels::cuda::BenchReport r = kernels::cuda::run_bench(shape, warmup, iters);
    fmt::print("bench B={} S={} Hq={} Hkv={} D={} block={} top_k={} mode={}{}: sparse keeps {:.3f}% of the causal "
               "(query, key) pairs; median of {} runs (SM MHz: the clock after the first and the last)\n",
               a.batch, s, a.heads, a.kv_heads, a.head_dim, a.block_size, a.top_k, a.mode,
               a.deterministic ? " deterministic" : "", 100 * r.kept_pairs, iters);
    double dense_fwd = 0, dense_fb = 0;
    for (const auto& row : r.rows) {
      if (row.name == "cuDNN dense fwd") dense_fwd = row.ms;
      if (row.name == "cuDNN dense fwd+bwd") dense_fb = row.ms;
    }
    fmt::print("  {:<30} {:>9} {:>9} {:>12} {:>14} {:>11}\n", "case", "ms", "TFLOP/s", "GB/s (min)", "cuDNN / this",
               "SM MHz");
    for (const auto& row : r.rows) {
      const bool fwd_only = row.name.find("fwd+bwd") == std::string::npos && row.name.find("total") == std::string::npos;
      const double ref = fwd_only ? dense_fwd : dense_fb;
      fmt::print("  {:<30} {:>9.3f} {:>9.1f} {:>12.0f} {:>13.2f}x {:>11}\n", row.name, row.ms, row.tflops, row.gbps,
                 ref / row.ms, fmt::format("{:.0f}-{:.0f}", row.mhz_first, row.mhz_last));
    }
    if (!profile_dir.empty()) profile_sparse_total(shape, warmup, iters, profile_dir);
  }
  return kExitOk;
}
#endif  // SSA_WITH_CUDA

}  // namespace

void add_attn_command(CLI::App& app, int& exit_code) {
  auto* attn = app.add_subcommand("attn", "Check and time the CUDA attention kernels");
  attn->require_subcommand(1);

  auto check_args = std::make_shared<AttnArgs>();
  auto input = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto* check = attn->add_subcommand(
      "check", "Compare the CUDA selection and sparse attention (o, lse, dq, dk, dv) with the reference backend");
  add_shape_options(check, *check_args);
  check->add_option("--seq", check_args->seqs, "sequence lengths (default 4096)")->check(CLI::PositiveNumber);
  check->add_option("--seed", check_args->seed, "random seed of inputs and loss weights")->capture_default_str();
  check->add_option("--input", *input, "HDF5 tensor file with q [B, S, Hq, D], k and v [B, S, Hkv, D]")
      ->check(CLI::ExistingFile);
  check->add_option("--out", *out, "write inputs, block ids and every result of both backends to this HDF5 file");
  check->callback([check_args, input, out, &exit_code] {
    if (!require_gpu("check")) {
      exit_code = kExitFailure;
      return;
    }
#ifdef SSA_WITH_CUDA
    exit_code = run_check(*check_args, *input, *out);
#endif
  });

  auto bench_args = std::make_shared<AttnArgs>();
  auto warmup = std::make_shared<int>(3);
  auto iters = std::make_shared<int>(10);
  auto* bench = attn->add_subcommand(
      "bench", "Time selection, sparse forward and forward+backward against cuDNN dense attention");
  add_shape_options(bench, *bench_args);
  bench->add_option("--seq", bench_args->seqs, "sequence lengths (default 8192 32768)")->check(CLI::PositiveNumber);
  bench->add_option("--warmup", *warmup, "untimed runs first")->check(CLI::NonNegativeNumber)->capture_default_str();
  bench->add_option("--iters", *iters, "timed runs (the median is printed)")->check(CLI::PositiveNumber)->capture_default_str();
  auto profile = std::make_shared<std::string>();
  bench->add_option("--profile", *profile,
                    "also trace the sparse total case (LibTorch profiler) into DIR/seq<S>/profile-rank0.json");
  bench->callback([bench_args, warmup, iters, profile, &exit_code] {
    if (!require_gpu("bench")) {
      exit_code = kExitFailure;
      return;
    }
#ifdef SSA_WITH_CUDA
    exit_code = run_bench(*bench_args, *warmup, *iters, *profile);
#endif
  });
}

}  // namespace ssa::launch
