#include "core/eval.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>

#include "core/checkpoint.h"
#include "core/cross_entropy.h"
#include "core/model.h"
#include "core/model_io.h"
#include "core/run_state.h"
#include "core/runtime.h"
#include "data/token_reader.h"

namespace ssa::core {
namespace {

// Sums of one (seq_len) pass over the eval sequences.
struct Accumulator {
  double full_nll = 0;
  std::vector<double> sparse_nll;                 // per top_k
  std::vector<std::vector<double>> sparsity;      // [top_k][layer] sums of per-sequence means
  std::vector<double> entropy;                    // [layer]
  int64_t tokens = 0;
  int64_t sequences = 0;
};

double nll_sum(const Transformer& model, const at::Tensor& tokens, const at::Tensor& labels,
               const at::Tensor& positions, const StreamSettings& settings, int64_t chunk,
               const LayerObserver* observer) {
  auto result = model.forward(tokens, positions, settings, Recompute::kNone, observer);
  auto hidden = result.hidden.reshape({-1, result.hidden.size(-1)});
  auto ce = chunked_cross_entropy(hidden, model.embedding(), labels.reshape({-1}), chunk);
  return ce.item<double>() * static_cast<double>(labels.numel());
}

}  // namespace

EvalReport run_eval(const Config& config_in, const std::filesystem::path& checkpoint) {
  Config config = config_in;
  const auto state = run_state_from_json(read_text_file(checkpoint / "state.json"), (checkpoint / "state.json").string());
  Config trained = config_from_json(state.config_json, (checkpoint / "state.json").string());
  config.model = trained.model;
  config.attention.block_size = trained.attention.block_size;
  Runtime rt = choose_runtime(config.train, 0);
  Transformer model(config.model, rt.device, rt.dtype, 0);
  load_model_weights(model, (checkpoint / "model.h5").string());
  EvalReport report = evaluate_model(config, model, rt);
  report.checkpoint = checkpoint.string();
  return report;
}

EvalReport evaluate_model(const Config& config, const Transformer& model, const Runtime& rt) {
  at::NoGradGuard no_grad;
  EvalReport report;
  const auto& top_ks = config.eval.top_ks;
  const int64_t n_layers = model.config().n_layers;
  for (int64_t seq_len : config.eval.seq_lens) {
    data::ReaderOptions ro;
    ro.dir = config.eval.data;
    ro.seq_len = seq_len;
    ro.global_batch = 1;
    ro.seed = 0;
    ro.prefetch = 2;
    data::TokenReader reader(ro);
    if (reader.samples_per_epoch() < 1)
      throw std::runtime_error(fmt::format("eval data {} has fewer than {} tokens: cannot evaluate seq_len {}",
                                           config.eval.data, seq_len + 1, seq_len));
    const int64_t sequences = std::min<int64_t>(config.eval.batches, reader.samples_per_epoch());
    Accumulator acc;
    acc.sparse_nll.assign(top_ks.size(), 0.0);
    acc.sparsity.assign(top_ks.size(), std::vector<double>(static_cast<size_t>(n_layers), 0.0));
    acc.entropy.assign(static_cast<size_t>(n_layers), 0.0);

    StreamSettings settings;
    settings.sparse = sparse_options(config.attention, rt.device);
    settings.seq_len = seq_len;
    for (int64_t i = 0; i < sequences; ++i) {
      data::Batch batch = reader.next();
      auto tokens = at::tensor(batch.inputs, at::kInt).to(at::kLong).view({1, seq_len}).to(rt.device);
      auto labels = at::tensor(batch.labels, at::kInt).to(at::kLong).view({1, seq_len}).to(rt.device);
      auto positions = at::tensor(batch.positions, at::kLong).to(rt.device);
      // Full inference, observing each layer's q/k for the attention statistics.
      LayerObserver observe = [&](int64_t layer, const at::Tensor& q, const at::Tensor& k) {
        auto pooled = kernels::pool_keys(k, settings.sparse.block_size);
        for (size_t t = 0; t < top_ks.size(); ++t) {
          auto options = settings.sparse;
          options.top_k = top_ks[t];
          auto ids = kernels::select_blocks(q, pooled, options);
          auto stats = kernels::attention_stats(q, k, ids, options.block_size);
          acc.sparsity[t][static_cast<size_t>(layer)] += stats.sparsity;
          if (t == 0) acc.entropy[static_cast<size_t>(layer)] += stats.entropy_bits;
        }
      };
      settings.mode = AttentionMode::kFull;
      acc.full_nll += nll_sum(model, tokens, labels, positions, settings, config.train.ce_chunk_tokens, &observe);
      settings.mode = AttentionMode::kSparse;
      for (size_t t = 0; t < top_ks.size(); ++t) {
        settings.sparse.top_k = top_ks[t];
        acc.sparse_nll[t] += nll_sum(model, tokens, labels, positions, settings, config.train.ce_chunk_tokens, nullptr);
      }
      acc.tokens += seq_len;
      ++acc.sequences;
    }
    const double n = static_cast<double>(acc.sequences);
    for (size_t t = 0; t < top_ks.size(); ++t) {
      EvalRow row;
      row.seq_len = seq_len;
      row.top_k = top_ks[t];
      row.tokens = acc.tokens;
      row.full_perplexity = std::exp(acc.full_nll / static_cast<double>(acc.tokens));
      row.sparse_perplexity = std::exp(acc.sparse_nll[t] / static_cast<double>(acc.tokens));
      for (int64_t l = 0; l < n_layers; ++l) {
        row.layer_sparsity.push_back(acc.sparsity[t][static_cast<size_t>(l)] / n);
        row.layer_entropy_bits.push_back(acc.entropy[static_cast<size_t>(l)] / n);
      }
      for (double v : row.layer_sparsity) row.sparsity += v / static_cast<double>(n_layers);
      for (double v : row.layer_entropy_bits) row.entropy_bits += v / static_cast<double>(n_layers);
      report.rows.push_back(std::move(row));
    }
  }
  return report;
}

std::string EvalReport::to_json() const {
  nlohmann::ordered_json j;
  j["checkpoint"] = checkpoint;
  j["rows"] = nlohmann::ordered_json::array();
  for (const auto& r : rows) {
    j["rows"].push_back({{"seq_len", r.seq_len},
                         {"top_k", r.top_k},
                         {"tokens", r.tokens},
                         {"full_perplexity", r.full_perplexity},
                         {"sparse_perplexity", r.sparse_perplexity},
                         {"sparsity", r.sparsity},
                         {"entropy_bits", r.entropy_bits},
                         {"layer_sparsity", r.layer_sparsity},
                         {"layer_entropy_bits", r.layer_entropy_bits}});
  }
  return j.dump(2);
}

std::string EvalReport::to_table() const {
  std::string out = fmt::format("{:>8} {:>6} {:>10} {:>12} {:>10} {:>13}\n", "seq_len", "top_k", "full PPL",
                                "sparse PPL", "sparsity", "entropy(bits)");
  for (const auto& r : rows)
    out += fmt::format("{:>8} {:>6} {:>10.3f} {:>12.3f} {:>10.4f} {:>13.3f}\n", r.seq_len, r.top_k, r.full_perplexity,
                       r.sparse_perplexity, r.sparsity, r.entropy_bits);
  return out;
}

}  // namespace ssa::core
