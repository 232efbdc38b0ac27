#include "monitoring/record_json.h"

#include <chrono>

namespace ssa::monitoring {
namespace {

double unix_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

nlohmann::ordered_json to_json(const StepRecord& r) {
  nlohmann::ordered_json j;
  j["kind"] = "step";
  j["time"] = unix_seconds();
  j["step"] = r.step;
  j["total_steps"] = r.total_steps;
  j["tokens_seen"] = r.tokens_seen;
  j["loss"] = r.loss;
  j["ce_loss"] = r.ce_loss;
  j["sparsity_loss"] = r.sparsity_loss;
  j["commitment_loss"] = r.commitment_loss;
  j["mode"] = r.mode;
  j["full_passes"] = r.full_passes;
  j["sparse_passes"] = r.sparse_passes;
  j["lr"] = r.lr;
  j["grad_norm"] = r.grad_norm;
  j["step_seconds"] = r.step_seconds;
  j["tokens_per_second"] = r.tokens_per_second;
  j["mfu"] = r.mfu;
  j["data_wait_seconds"] = r.data_wait_seconds;
  j["comm_seconds"] = nlohmann::ordered_json::object();
  for (const auto& [op, seconds] : r.comm_seconds) j["comm_seconds"][op] = seconds;
  j["gpu_memory_bytes"] = r.gpu_memory_bytes;
  j["cp_bytes_full"] = r.cp_bytes_full;
  j["cp_bytes_sparse"] = r.cp_bytes_sparse;
  j["skipped_steps"] = r.skipped_steps;
  // null on steps that wrote no checkpoint, so every line has the same keys.
  j["checkpoint_seconds"] = r.checkpoint_seconds ? nlohmann::ordered_json(*r.checkpoint_seconds) : nlohmann::ordered_json();
  j["eta_seconds"] = r.eta_seconds;
  return j;
}

nlohmann::ordered_json to_json(const EvalRecord& r) {
  nlohmann::ordered_json j;
  j["kind"] = "eval";
  j["time"] = unix_seconds();
  j["step"] = r.step;
  j["seq_len"] = r.seq_len;
  j["top_k"] = r.top_k;
  j["full_perplexity"] = r.full_perplexity;
  j["sparse_perplexity"] = r.sparse_perplexity;
  j["sparsity"] = r.sparsity;
  j["entropy_bits"] = r.entropy_bits;
  return j;
}

}  // namespace ssa::monitoring
