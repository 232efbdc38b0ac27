#include "core/model.h"

#include <torch/csrc/autograd/custom_function.h>

#include <cmath>

#include "core/rope.h"
#include "parallel/context_attention.h"

namespace ssa::core {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// LibTorch's RMSNorm: statistics in fp32 for bf16/fp16 inputs; on a GPU one
// fused kernel forward and one backward (instead of ~10 elementwise kernels).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return at::rms_norm(x, {x.size(-1)}, weight, eps);
}

// Everything one decoder layer needs besides its weights.
struct LayerInputs {
  const ModelConfig* model;
  const StreamSettings* settings;
  const RotaryTable* rotary;
  const LayerObserver* observer = nullptr;
  parallel::AttentionMemo* memo = nullptr;  // Recompute::kKeepAttention
};

// One decoder layer: x [B, S, H] -> (x', L_s, L_c).
variable_list layer_forward(int64_t layer, const at::Tensor& x, const LayerWeights& w, const LayerInputs& in,
                            int64_t* bytes_full, int64_t* bytes_sparse) {
  const auto& m = *in.model;
  const int64_t B = x.size(0), S = x.size(1), D = m.resolved_head_dim();
  auto h = rms_norm(x, w.attn_norm, m.norm_eps);
  auto q = apply_rotary(at::linear(h, w.wq).view({B, S, m.n_heads, D}), *in.rotary);
  auto k = apply_rotary(at::linear(h, w.wk).view({B, S, m.n_kv_heads, D}), *in.rotary);
  auto v = at::linear(h, w.wv).view({B, S, m.n_kv_heads, D});
  auto gate = at::sigmoid(at::linear(h, w.wg)).unsqueeze(-1);  // [B, S, Hq, 1]
  if (in.observer) (*in.observer)(layer, q, k);
  auto attn = ssa_attention(q, k, v, gate, *in.settings, in.memo);
  if (bytes_full) *bytes_full += attn.bytes_full;
  if (bytes_sparse) *bytes_sparse += attn.bytes_sparse;
  auto y = x + at::linear(attn.out.reshape({B, S, m.n_heads * D}), w.wo);
  auto h2 = rms_norm(y, w.mlp_norm, m.norm_eps);
  y = y + at::linear(at::silu(at::linear(h2, w.w_gate)) * at::linear(h2, w.w_up), w.w_down);
  return {y, attn.sparsity_loss, attn.commitment_loss};
}

variable_list layer_tensors(const LayerWeights& w) {
  return {w.attn_norm, w.wq, w.wk, w.wv, w.wg, w.wo, w.mlp_norm, w.w_gate, w.w_up, w.w_down};
}
LayerWeights layer_from(const variable_list& t, size_t first) {
  return {t[first], t[first + 1], t[first + 2], t[first + 3], t[first + 4],
          t[first + 5], t[first + 6], t[first + 7], t[first + 8], t[first + 9]};
}

// Per-layer activation recomputation: forward runs without building a graph and
// keeps only the layer input; backward re-runs the layer with grad and
// back-propagates through it. Mode and selection are deterministic given the
// inputs, so the re-run computes the same function.
// Owns copies of what the layer needs, since backward runs after forward() has
// returned (the settings and rotary table of forward() are gone by then).
// One closure per layer: with Recompute::kKeepAttention its memo carries the
// layer's attention outputs from the forward to the re-run.
struct RecomputeClosure : torch::CustomClassHolder {
  const ModelConfig* model = nullptr;  // owned by the Transformer, which outlives the step
  StreamSettings settings;
  RotaryTable rotary;
  std::shared_ptr<parallel::AttentionMemo> memo;  // null: the re-run recomputes attention too
  int64_t bytes_full = 0;  // cp traffic of the forward pass (not of the re-run)
  int64_t bytes_sparse = 0;
  LayerInputs inputs() const { return {model, &settings, &rotary, nullptr, memo.get()}; }
};

class RecomputedLayer : public torch::autograd::Function<RecomputedLayer> {
 public:
  // inputs: x, then the 10 layer weights.
  static variable_list forward(AutogradContext* ctx, c10::intrusive_ptr<RecomputeClosure> closure,
                               at::TensorList input_list) {
    variable_list inputs = input_list.vec();
    variable_list out;
    {
      at::NoGradGuard no_grad;
      out = layer_forward(0, inputs[0], layer_from(inputs, 1), closure->inputs(), &closure->bytes_full,
                          &closure->bytes_sparse);
    }
    ctx->save_for_backward(inputs);
    ctx->saved_data["closure"] = c10::IValue::make_capsule(closure);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto capsule = ctx->saved_data["closure"].toCapsule();
    auto closure = c10::static_intrusive_pointer_cast<RecomputeClosure>(capsule);
    variable_list inputs;
    for (const auto& t : saved) inputs.push_back(t.detach().requires_grad_(t.requires_grad()));
    variable_list outputs;
    {
      at::AutoGradMode enable(true);
      outputs = layer_forward(0, inputs[0], layer_from(inputs, 1), closure->inputs(), nullptr, nullptr);
    }
    variable_list used_outputs, used_grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (grads[i].defined() && outputs[i].requires_grad()) {
        used_outputs.push_back(outputs[i]);
        used_grads.push_back(grads[i]);
      }
    }
    variable_list wanted;
    for (const auto& t : inputs)
      if (t.requires_grad()) wanted.push_back(t);
    auto computed = torch::autograd::grad(used_outputs, wanted, used_grads, /*retain_graph=*/false,
                                          /*create_graph=*/false, /*allow_unused=*/true);
    variable_list result{at::Tensor()};  // no gradient for the closure
    size_t next = 0;
    for (const auto& t : inputs) result.push_back(t.requires_grad() ? computed[next++] : at::Tensor());
    return result;
  }
};

at::Tensor init_normal(at::IntArrayRef shape, double std, at::Generator& gen) {
  return at::normal(0.0, std, shape, gen, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

Transformer::Transformer(const ModelConfig& config, at::Device device, at::ScalarType dtype, uint64_t seed)
    : config_(config) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t H = config.hidden, D = config.resolved_head_dim(), F = config.ffn_hidden;
  const double std = config.init_std;
  const double out_std = std / std::sqrt(2.0 * static_cast<double>(config.n_layers));
  auto place = [&](at::Tensor t) { return t.to(device, dtype).detach().requires_grad_(true); };
  auto ones = [&](int64_t n) { return place(at::ones({n}, at::kFloat)); };
  embedding_ = place(init_normal({config.vocab_size, H}, std, gen));
  for (int64_t l = 0; l < config.n_layers; ++l) {
    LayerWeights w;
    w.attn_norm = ones(H);
    w.wq = place(init_normal({config.n_heads * D, H}, std, gen));
    w.wk = place(init_normal({config.n_kv_heads * D, H}, std, gen));
    w.wv = place(init_normal({config.n_kv_heads * D, H}, std, gen));
    w.wg = place(init_normal({config.n_heads, H}, std, gen));
    w.wo = place(init_normal({H, config.n_heads * D}, out_std, gen));
    w.mlp_norm = ones(H);
    w.w_gate = place(init_normal({F, H}, std, gen));
    w.w_up = place(init_normal({F, H}, std, gen));
    w.w_down = place(init_normal({H, F}, out_std, gen));
    layers_.push_back(std::move(w));
  }
  final_norm_ = ones(H);
}

RotaryTable Transformer::rotary_for(const at::Tensor& positions) const {
  const std::lock_guard<std::mutex> lock(rotary_mutex_);
  RotaryCache& c = rotary_cache_;
  if (!c.positions.is_same(positions) || c.version != positions._version()) {
    c.table = rotary_table(positions.to(embedding_.device()), config_.resolved_head_dim(), config_.rope_theta,
                           config_.rope_scaling);
    c.positions = positions;
    c.version = positions._version();
  }
  return c.table;
}

ForwardResult Transformer::forward(const at::Tensor& tokens, const at::Tensor& positions,
                                   const StreamSettings& settings, Recompute recompute,
                                   const LayerObserver* observer) const {
  TORCH_CHECK(tokens.dim() == 2, "Transformer::forward: tokens must be [B, S_local], got ", tokens.sizes());
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == tokens.size(1),
              "Transformer::forward: positions must be [S_local]");
  const RotaryTable rotary = rotary_for(positions);
  LayerInputs inputs{&config_, &settings, &rotary, observer};
  ForwardResult result;
  auto x = at::embedding(embedding_, tokens.to(embedding_.device()));  // [B, S, H]
  auto sum_ls = at::zeros({}, x.options().dtype(at::kFloat));
  auto sum_lc = sum_ls.clone();
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& w = layers_[l];
    variable_list out;
    if (recompute != Recompute::kNone && at::GradMode::is_enabled()) {
      auto closure = c10::make_intrusive<RecomputeClosure>();
      closure->model = &config_;
      closure->settings = settings;
      closure->rotary = rotary;
      if (recompute == Recompute::kKeepAttention) closure->memo = parallel::make_attention_memo();
      variable_list args{x};
      for (const auto& t : layer_tensors(w)) args.push_back(t);
      // As a TensorList so autograd sees each tensor as an input.
      out = RecomputedLayer::apply(closure, at::TensorList(args));
      result.bytes_full += closure->bytes_full;
      result.bytes_sparse += closure->bytes_sparse;
    } else {
      out = layer_forward(static_cast<int64_t>(l), x, w, inputs, &result.bytes_full, &result.bytes_sparse);
    }
    x = out[0];
    sum_ls = sum_ls + out[1];
    sum_lc = sum_lc + out[2];
  }
  const double layers = static_cast<double>(layers_.size());
  result.hidden = rms_norm(x, final_norm_, config_.norm_eps);
  result.sparsity_loss = sum_ls / layers;
  result.commitment_loss = sum_lc / layers;
  return result;
}

std::vector<NamedParameter> Transformer::parameters() const {
  std::vector<NamedParameter> params;
  params.push_back({"embedding", embedding_, true});
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& w = layers_[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    params.push_back({p + "attn_norm", w.attn_norm, false});
    params.push_back({p + "wq", w.wq, true});
    params.push_back({p + "wk", w.wk, true});
    params.push_back({p + "wv", w.wv, true});
    params.push_back({p + "wg", w.wg, true});
    params.push_back({p + "wo", w.wo, true});
    params.push_back({p + "mlp_norm", w.mlp_norm, false});
    params.push_back({p + "w_gate", w.w_gate, true});
    params.push_back({p + "w_up", w.w_up, true});
    params.push_back({p + "w_down", w.w_down, true});
  }
  params.push_back({"final_norm", final_norm_, false});
  return params;
}

int64_t Transformer::parameter_count() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.tensor.numel();
  return n;
}

double training_flops_per_token(const ModelConfig& m, int64_t seq_len, AttentionMode mode, int64_t top_k,
                                int64_t block_size) {
  const double H = static_cast<double>(m.hidden), D = static_cast<double>(m.resolved_head_dim());
  const double Hq = static_cast<double>(m.n_heads), Hkv = static_cast<double>(m.n_kv_heads);
  const double F = static_cast<double>(m.ffn_hidden);
  const double per_layer = H * (Hq * D) * 2 + H * (Hkv * D) * 2 + H * Hq + 3 * H * F;
  const double matrices = per_layer * static_cast<double>(m.n_layers) + static_cast<double>(m.vocab_size) * H;
  // QK^T and PV: 2 matmuls x 2 FLOPs per multiply-add, x3 for forward + backward.
  const double per_key = 12.0 * Hq * D * static_cast<double>(m.n_layers);
  const double full_keys = static_cast<double>(seq_len) / 2.0;
  const double sparse_keys = std::min(full_keys, static_cast<double>(top_k * block_size));
  double keys = 0;
  if (mode != AttentionMode::kSparse) keys += full_keys;
  if (mode != AttentionMode::kFull) keys += sparse_keys;
  return 6.0 * matrices + per_key * keys;
}

}  // namespace ssa::core
