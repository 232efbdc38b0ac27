#pragma once
// `ssa eval`: perplexity under full and under sparse inference at the given
// context lengths and sparse budgets, and the attention sparsity and entropy
// (bits) of the full attention (ssa-method.md), per layer and mean.
#include <filesystem>
#include <string>
#include <vector>

#include "core/config.h"

namespace ssa::core {

struct EvalRow {
  int64_t seq_len = 0;
  int64_t top_k = 0;                 // sparse budget in blocks (0 for the full-inference row)
  double full_perplexity = 0;        // same for every top_k of a seq_len
  double sparse_perplexity = 0;
  double sparsity = 0;               // mean over layers
  double entropy_bits = 0;           // mean over layers (independent of top_k)
  std::vector<double> layer_sparsity;
  std::vector<double> layer_entropy_bits;
  int64_t tokens = 0;                // tokens scored
};

struct EvalReport {
  std::string checkpoint;
  std::vector<EvalRow> rows;
  std::string to_json() const;
  std::string to_table() const;
};

class Transformer;
struct Runtime;

// Evaluates `model` (on rt.device) with the eval section of `config`.
EvalReport evaluate_model(const Config& config, const Transformer& model, const Runtime& rt);

// Evaluates the model of `checkpoint` (a step folder) with `config` (its eval
// section and device settings; model settings come from the checkpoint).
EvalReport run_eval(const Config& config, const std::filesystem::path& checkpoint);

}  // namespace ssa::core
