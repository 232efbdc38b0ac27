#pragma once
// Llama-style decoder for SSA training: tied embeddings, RMSNorm, RoPE at global
// positions, grouped-query attention with a per-head sigmoid output gate, SwiGLU
// MLP. Parameters are plain leaf tensors (no torch::nn), listed by name so the
// optimizer can flatten/shard them and checkpoints can store them.
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/rope.h"
#include "core/ssa_layer.h"

namespace ssa::core {

struct NamedParameter {
  std::string name;
  at::Tensor tensor;  // leaf, requires_grad
  bool decay;         // weight decay applies (matrices and embeddings, not norms)
};

struct LayerWeights {
  at::Tensor attn_norm;  // [H]
  at::Tensor wq;         // [Hq*D, H]
  at::Tensor wk;         // [Hkv*D, H]
  at::Tensor wv;         // [Hkv*D, H]
  at::Tensor wg;         // [Hq, H] per-head output gate
  at::Tensor wo;         // [H, Hq*D]
  at::Tensor mlp_norm;   // [H]
  at::Tensor w_gate;     // [F, H]
  at::Tensor w_up;       // [F, H]
  at::Tensor w_down;     // [H, F]
};

struct ForwardResult {
  at::Tensor hidden;           // [B, S_local, H] after the final norm
  at::Tensor sparsity_loss;    // fp32 scalar, mean over layers of L_s
  at::Tensor commitment_loss;  // fp32 scalar, mean over layers of L_c
  int64_t bytes_full = 0;      // cp bytes moved by each stream, summed over layers
  int64_t bytes_sparse = 0;
};

// Sees each layer's rotated q [B, S, Hq, D] and k [B, S, Hkv, D] during forward
// (eval statistics). Not called inside recomputation.
using LayerObserver = std::function<void(int64_t layer, const at::Tensor& q, const at::Tensor& k)>;

// Activation recomputation (with gradients enabled): none; each layer re-run in
// the backward but its attention outputs (and selection, and cp ring) kept from
// the forward; or the whole layer re-run, attention included (least memory).
enum class Recompute { kNone, kKeepAttention, kFull };

class Transformer {
 public:
  // Llama-style init from `seed`: normal(0, init_std) for matrices and the
  // embedding, output projections (wo, w_down) scaled by 1/sqrt(2 * n_layers),
  // norms at 1. Weights are created in fp32 on the CPU (same values on every
  // device and rank) and then moved to device/dtype.
  Transformer(const ModelConfig& config, at::Device device, at::ScalarType dtype, uint64_t seed);

  // tokens: [B, S_local] int64, positions: [S_local] int64 global positions.
  ForwardResult forward(const at::Tensor& tokens, const at::Tensor& positions, const StreamSettings& settings,
                        Recompute recompute, const LayerObserver* observer = nullptr) const;

  std::vector<NamedParameter> parameters() const;
  const at::Tensor& embedding() const { return embedding_; }  // [V, H], also the output projection
  const ModelConfig& config() const { return config_; }
  int64_t parameter_count() const;

 private:
  ModelConfig config_;
  // The rotary table of the last positions tensor seen (the trainer passes the
  // same tensor while the positions do not change): ~12 small kernels a step saved.
  struct RotaryCache {
    at::Tensor positions;
    uint32_t version = 0;
    RotaryTable table;
  };
  mutable RotaryCache rotary_cache_;
  mutable std::mutex rotary_mutex_;
  RotaryTable rotary_for(const at::Tensor& positions) const;

  at::Tensor embedding_;
  at::Tensor final_norm_;
  std::vector<LayerWeights> layers_;
};

// Model FLOPs of one training step's forward+backward per token, for MFU:
// 6 * (matrix parameters incl. the tied output projection) + the attention
// matmuls of each computed stream (causal full: S/2 keys per query on average;
// sparse: top_k * block_size keys).
double training_flops_per_token(const ModelConfig& model, int64_t seq_len, AttentionMode mode, int64_t top_k,
                                int64_t block_size);

}  // namespace ssa::core
