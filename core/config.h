#pragma once
// The run configuration: one small typed struct per component, each listing its
// fields once in visit(). Loading YAML, `--set a.b=value` overrides, range checks,
// JSON output and the docs all walk that one list, so a field is declared once.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace ssa::core {

// A bad configuration: names the key, the value and the rule it broke.
// The CLI turns it into exit code 2.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Receives every field of a section with its rule. Implemented by the YAML
// loader, the override setter, the validator and the JSON writer.
class FieldVisitor {
 public:
  virtual ~FieldVisitor() = default;
  virtual void integer(std::string_view key, int64_t& value, int64_t min, int64_t max, std::string_view doc) = 0;
  virtual void real(std::string_view key, double& value, double min, double max, std::string_view doc) = 0;
  virtual void boolean(std::string_view key, bool& value, std::string_view doc) = 0;
  // choices empty: any string.
  virtual void text(std::string_view key, std::string& value, std::vector<std::string_view> choices,
                    std::string_view doc) = 0;
  virtual void integers(std::string_view key, std::vector<int64_t>& value, int64_t min, int64_t max,
                        std::string_view doc) = 0;
};

constexpr int64_t kNoMax = INT64_MAX;

struct ModelConfig {
  int64_t vocab_size = 264;  // 256 bytes + EOS, rounded up to a multiple of 8
  int64_t hidden = 256;
  int64_t n_layers = 4;
  int64_t n_heads = 8;
  int64_t n_kv_heads = 2;
  int64_t head_dim = 0;  // 0: hidden / n_heads
  int64_t ffn_hidden = 768;
  double rope_theta = 10000.0;
  double rope_scaling = 1.0;
  double norm_eps = 1e-5;
  double init_std = 0.02;
  void visit(FieldVisitor& v);
  int64_t resolved_head_dim() const { return head_dim > 0 ? head_dim : hidden / n_heads; }
};

struct AttentionConfig {
  std::string mode = "ssa";        // ssa | full | sparse
  int64_t block_size = 16;
  int64_t top_k = 4;
  std::string selection = "token";  // token | query_block
  std::string backend = "auto";     // auto | reference | cuda
  bool deterministic = false;
  void visit(FieldVisitor& v);
};

struct SsaConfig {
  double alpha = 10.0;
  double full_probability = 0.5;
  double smooth_l1_beta = 1.0;
  bool align_after_gate = true;
  void visit(FieldVisitor& v);
};

struct OptimizerConfig {
  double lr = 3e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;
  bool zero = true;
  int64_t bucket_mb = 128;         // fp32 gradient bucket size
  bool overlap_reduction = true;   // reduce buckets during the backward
  void visit(FieldVisitor& v);
};

struct ScheduleConfig {
  double warmup_fraction = 0.05;
  double final_lr_fraction = 0.0;
  void visit(FieldVisitor& v);
};

struct TrainConfig {
  int64_t steps = 300;
  int64_t seq_len = 256;
  int64_t global_batch = 8;  // sequences per optimizer step, over all dp ranks
  int64_t micro_batch = 4;   // sequences per forward pass on one dp rank
  int64_t seed = 1234;
  std::string device = "auto";  // auto | cpu | cuda
  std::string dtype = "auto";   // auto | fp32 | bf16
  int64_t cuda_connections = 2;  // CUDA_DEVICE_MAX_CONNECTIONS; 0: the driver's default
  bool recompute = false;
  bool recompute_attention = false;  // with recompute: re-run attention too instead of keeping its outputs
  int64_t ce_chunk_tokens = 1024;
  int64_t max_nonfinite_steps = 5;
  void visit(FieldVisitor& v);
};

struct DataConfig {
  std::string path = "data-cache/gcide";
  int64_t prefetch = 4;
  void visit(FieldVisitor& v);
};

struct ParallelConfig {
  int64_t dp = 1;
  int64_t cp = 1;
  void visit(FieldVisitor& v);
};

struct CheckpointConfig {
  int64_t every = 100;
  int64_t keep = 3;
  void visit(FieldVisitor& v);
};

struct MonitoringConfig {
  bool enabled = true;
  std::string bind = "127.0.0.1";
  int64_t port = 9400;
  bool jsonl = true;
  int64_t progress_every = 10;
  int64_t profile_start = 3;  // first profiled step (1-based)
  int64_t profile_steps = 0;  // 0: no profile
  void visit(FieldVisitor& v);
};

struct EvalConfig {
  std::string data = "data-cache/gcide/val";
  std::vector<int64_t> seq_lens{256};
  std::vector<int64_t> top_ks{2, 4, 8};
  int64_t batches = 8;
  bool at_end = true;  // the trainer evaluates after its last step
  void visit(FieldVisitor& v);
};

struct Config {
  ModelConfig model;
  AttentionConfig attention;
  SsaConfig ssa;
  OptimizerConfig optimizer;
  ScheduleConfig schedule;
  TrainConfig train;
  DataConfig data;
  ParallelConfig parallel;
  CheckpointConfig checkpoint;
  MonitoringConfig monitoring;
  EvalConfig eval;

  // Calls fn(section_name, section.visit) for every section, in order.
  template <class Fn>
  void for_each_section(Fn&& fn) {
    fn("model", [&](FieldVisitor& v) { model.visit(v); });
    fn("attention", [&](FieldVisitor& v) { attention.visit(v); });
    fn("ssa", [&](FieldVisitor& v) { ssa.visit(v); });
    fn("optimizer", [&](FieldVisitor& v) { optimizer.visit(v); });
    fn("schedule", [&](FieldVisitor& v) { schedule.visit(v); });
    fn("train", [&](FieldVisitor& v) { train.visit(v); });
    fn("data", [&](FieldVisitor& v) { data.visit(v); });
    fn("parallel", [&](FieldVisitor& v) { parallel.visit(v); });
    fn("checkpoint", [&](FieldVisitor& v) { checkpoint.visit(v); });
    fn("monitoring", [&](FieldVisitor& v) { monitoring.visit(v); });
    fn("eval", [&](FieldVisitor& v) { eval.visit(v); });
  }

  // Checks every field's range and the rules that tie fields together.
  // Throws ConfigError naming the key, the value and the rule.
  void validate();
  // The resolved configuration as pretty JSON (every field, defaults included).
  std::string to_json();
};

// Reads a YAML file over the defaults. Unknown keys and wrong types throw.
Config load_config_file(const std::string& path);
// Parses a YAML document (string) over `config`. `origin` names it in errors.
void apply_yaml(Config& config, const std::string& yaml_text, const std::string& origin);
// Applies one `section.key=value` override; value is parsed as a YAML scalar or list.
void apply_override(Config& config, const std::string& assignment);
// Reads the JSON written by to_json() (used when a run resumes).
Config config_from_json(const std::string& json_text, const std::string& origin);

}  // namespace ssa::core
