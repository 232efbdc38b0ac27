#include "core/config.h"

#include <yaml-cpp/yaml.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <functional>
#include <set>
#include <sstream>

namespace ssa::core {

void ModelConfig::visit(FieldVisitor& v) {
  v.integer("vocab_size", vocab_size, 2, kNoMax, "token ids are < vocab_size");
  v.integer("hidden", hidden, 1, kNoMax, "model width");
  v.integer("n_layers", n_layers, 1, kNoMax, "decoder layers");
  v.integer("n_heads", n_heads, 1, kNoMax, "query heads");
  v.integer("n_kv_heads", n_kv_heads, 1, kNoMax, "key/value heads (GQA); divides n_heads");
  v.integer("head_dim", head_dim, 0, 1024, "per-head width; 0 means hidden / n_heads");
  v.integer("ffn_hidden", ffn_hidden, 1, kNoMax, "SwiGLU inner width");
  v.real("rope_theta", rope_theta, 1.0, 1e12, "RoPE base");
  v.real("rope_scaling", rope_scaling, 1.0, 1024.0, "RoPE position interpolation factor");
  v.real("norm_eps", norm_eps, 1e-12, 1e-2, "RMSNorm epsilon");
  v.real("init_std", init_std, 1e-6, 1.0, "std of the normal init of weights");
}

void AttentionConfig::visit(FieldVisitor& v) {
  v.text("mode", mode, {"ssa", "full", "sparse"},
         "ssa: both streams + alignment; full: FullAttn baseline; sparse: MoBA-style baseline");
  v.integer("block_size", block_size, 1, 4096, "tokens per key block");
  v.integer("top_k", top_k, 1, kNoMax, "selected blocks per query (current block included)");
  v.text("selection", selection, {"token", "query_block"}, "top-k per query token or per query block");
  v.text("backend", backend, {"auto", "reference", "cuda"}, "sparse attention implementation");
  v.boolean("deterministic", deterministic, "bitwise reproducible backward on GPU");
}

void SsaConfig::visit(FieldVisitor& v) {
  v.real("alpha", alpha, 0.0, 1e6, "weight of the alignment loss");
  v.real("full_probability", full_probability, 0.0, 1.0, "chance that a forward pass uses the full stream");
  v.real("smooth_l1_beta", smooth_l1_beta, 1e-9, 1e6, "SmoothL1 beta");
  v.boolean("align_after_gate", align_after_gate, "align outputs after the sigmoid output gate");
}

void OptimizerConfig::visit(FieldVisitor& v) {
  v.real("lr", lr, 0.0, 10.0, "peak learning rate");
  v.real("beta1", beta1, 0.0, 0.999999, "AdamW beta1");
  v.real("beta2", beta2, 0.0, 0.999999999, "AdamW beta2");
  v.real("eps", eps, 1e-30, 1.0, "AdamW epsilon");
  v.real("weight_decay", weight_decay, 0.0, 10.0, "decoupled weight decay");
  v.real("grad_clip", grad_clip, 0.0, 1e9, "global gradient-norm clip; 0 disables");
  v.boolean("zero", zero, "shard master weights and moments over dp");
  v.integer("bucket_mb", bucket_mb, 1, 1 << 16, "MiB of fp32 gradients per reduction bucket");
  v.boolean("overlap_reduction", overlap_reduction,
            "reduce each gradient bucket during the backward as soon as it is complete (keeps the fp32 "
            "buckets allocated between steps: 4 bytes per parameter)");
}

void ScheduleConfig::visit(FieldVisitor& v) {
  v.real("warmup_fraction", warmup_fraction, 0.0, 1.0, "linear warmup, as a fraction of train.steps");
  v.real("final_lr_fraction", final_lr_fraction, 0.0, 1.0, "cosine ends at lr * final_lr_fraction");
}

void TrainConfig::visit(FieldVisitor& v) {
  v.integer("steps", steps, 1, kNoMax, "optimizer steps");
  v.integer("seq_len", seq_len, 2, kNoMax, "tokens per sequence");
  v.integer("global_batch", global_batch, 1, kNoMax, "sequences per optimizer step over all dp ranks");
  v.integer("micro_batch", micro_batch, 1, kNoMax, "sequences per forward pass on one dp rank");
  v.integer("seed", seed, 0, kNoMax, "seed of init, data order and mode draws");
  v.text("device", device, {"auto", "cpu", "cuda"}, "auto: cuda when a GPU is present");
  v.text("dtype", dtype, {"auto", "fp32", "bf16"}, "auto: bf16 on GPU, fp32 on CPU");
  v.integer("cuda_connections", cuda_connections, 0, 32,
            "hardware work queues per GPU (CUDA_DEVICE_MAX_CONNECTIONS, set before the GPU is first used; the "
            "environment variable wins when set); 0: the driver's default (8). With collectives queued beside the "
            "compute stream, fewer queues shorten the gaps between kernels");
  v.boolean("recompute", recompute, "recompute each layer's activations in backward");
  v.boolean("recompute_attention", recompute_attention,
            "with recompute: re-run attention too (its selection and cp ring) instead of keeping each layer's "
            "attention outputs from the forward (per layer: both streams' outputs and log-sum-exps, the block ids "
            "and, with cp > 1, the sequence's K/V)");
  v.integer("ce_chunk_tokens", ce_chunk_tokens, 1, kNoMax, "tokens per cross-entropy chunk");
  v.integer("max_nonfinite_steps", max_nonfinite_steps, 1, kNoMax, "consecutive NaN/Inf steps that stop the run");
}

void DataConfig::visit(FieldVisitor& v) {
  v.text("path", path, {}, "folder of training shards");
  v.integer("prefetch", prefetch, 1, 1024, "batches the I/O thread reads ahead");
}

void ParallelConfig::visit(FieldVisitor& v) {
  v.integer("dp", dp, 1, 65536, "data-parallel replicas");
  v.integer("cp", cp, 1, 4096, "context-parallel ranks per replica");
}

void CheckpointConfig::visit(FieldVisitor& v) {
  v.integer("every", every, 0, kNoMax, "steps between checkpoints; 0: only at the end");
  v.integer("keep", keep, 1, 1000000, "checkpoints kept");
}

void MonitoringConfig::visit(FieldVisitor& v) {
  v.boolean("enabled", enabled, "serve Prometheus metrics");
  v.text("bind", bind, {}, "metrics bind address");
  v.integer("port", port, 0, 65535, "base port; rank r serves on port + local rank");
  v.boolean("jsonl", jsonl, "write <run>/metrics.jsonl");
  v.integer("progress_every", progress_every, 0, kNoMax, "console line every N steps; 0: none");
  v.integer("profile_start", profile_start, 1, kNoMax, "first step profiled when profile_steps > 0");
  v.integer("profile_steps", profile_steps, 0, kNoMax,
            "steps profiled (CPU operators and GPU kernels): <run>/profile-rank<R>.json and .txt; 0: none");
}

void EvalConfig::visit(FieldVisitor& v) {
  v.text("data", data, {}, "folder of held-out shards");
  v.integers("seq_lens", seq_lens, 2, kNoMax, "context lengths evaluated");
  v.integers("top_ks", top_ks, 1, kNoMax, "sparse budgets (blocks) evaluated");
  v.integer("batches", batches, 1, kNoMax, "sequences evaluated per context length");
  v.boolean("at_end", at_end, "evaluate after the last training step (metrics, JSONL, table)");
}

namespace {

std::string join_choices(const std::vector<std::string_view>& choices) {
  return fmt::format("one of {}", fmt::join(choices, ", "));
}

[[noreturn]] void fail(std::string_view key, std::string_view value, std::string_view rule) {
  throw ConfigError(fmt::format("config key '{}' = '{}': {}", key, value, rule));
}

// Checks each field against its declared range or choices.
class RangeChecker : public FieldVisitor {
 public:
  explicit RangeChecker(std::string section) : section_(std::move(section)) {}
  void integer(std::string_view key, int64_t& value, int64_t min, int64_t max, std::string_view) override {
    if (value < min || value > max) fail(path(key), std::to_string(value), range(min, max));
  }
  void real(std::string_view key, double& value, double min, double max, std::string_view) override {
    if (!(value >= min && value <= max)) fail(path(key), fmt::format("{}", value), fmt::format("must be in [{}, {}]", min, max));
  }
  void boolean(std::string_view, bool&, std::string_view) override {}
  void text(std::string_view key, std::string& value, std::vector<std::string_view> choices, std::string_view) override {
    if (choices.empty()) return;
    for (auto c : choices)
      if (c == value) return;
    fail(path(key), value, "must be " + join_choices(choices));
  }
  void integers(std::string_view key, std::vector<int64_t>& value, int64_t min, int64_t max, std::string_view) override {
    if (value.empty()) fail(path(key), "[]", "must list at least one value");
    for (int64_t x : value)
      if (x < min || x > max) fail(path(key), std::to_string(x), range(min, max));
  }

 private:
  std::string path(std::string_view key) const { return section_ + "." + std::string(key); }
  static std::string range(int64_t min, int64_t max) {
    return max == kNoMax ? fmt::format("must be >= {}", min) : fmt::format("must be in [{}, {}]", min, max);
  }
  std::string section_;
};

std::string scalar_text(const YAML::Node& node) {
  if (node.IsScalar()) return node.Scalar();
  std::ostringstream out;
  out << YAML::Dump(node);
  return out.str();
}

// Sets the field named `key` from a YAML node; records whether it was found.
class NodeSetter : public FieldVisitor {
 public:
  NodeSetter(std::string path, std::string key, const YAML::Node& node)
      : path_(std::move(path)), key_(std::move(key)), node_(node) {}
  bool found() const { return found_; }

  void integer(std::string_view key, int64_t& value, int64_t, int64_t, std::string_view) override {
    if (!match(key)) return;
    value = parse_integer(node_);
  }
  void real(std::string_view key, double& value, double, double, std::string_view) override {
    if (!match(key)) return;
    if (!node_.IsScalar()) type_error("a number");
    try {
      size_t used = 0;
      const std::string& s = node_.Scalar();
      value = std::stod(s, &used);
      if (used != s.size()) type_error("a number");
    } catch (const std::logic_error&) {
      type_error("a number");
    }
  }
  void boolean(std::string_view key, bool& value, std::string_view) override {
    if (!match(key)) return;
    const std::string s = node_.IsScalar() ? node_.Scalar() : "";
    if (s == "true" || s == "True" || s == "TRUE") value = true;
    else if (s == "false" || s == "False" || s == "FALSE") value = false;
    else type_error("true or false");
  }
  void text(std::string_view key, std::string& value, std::vector<std::string_view>, std::string_view) override {
    if (!match(key)) return;
    if (!node_.IsScalar()) type_error("a string");
    value = node_.Scalar();
  }
  void integers(std::string_view key, std::vector<int64_t>& value, int64_t, int64_t, std::string_view) override {
    if (!match(key)) return;
    std::vector<int64_t> out;
    if (node_.IsSequence()) {
      for (const auto& item : node_) out.push_back(parse_integer(item));
    } else if (node_.IsScalar()) {
      out.push_back(parse_integer(node_));
    } else {
      type_error("a list of integers");
    }
    value = std::move(out);
  }

 private:
  bool match(std::string_view key) {
    if (key != key_) return false;
    found_ = true;
    return true;
  }
  int64_t parse_integer(const YAML::Node& node) {
    if (!node.IsScalar()) type_error("an integer");
    const std::string& s = node.Scalar();
    try {
      size_t used = 0;
      int64_t v = std::stoll(s, &used);
      if (used != s.size()) type_error("an integer");
      return v;
    } catch (const std::logic_error&) {
      type_error("an integer");
    }
  }
  [[noreturn]] void type_error(std::string_view expected) {
    fail(path_ + "." + key_, scalar_text(node_), fmt::format("must be {}", expected));
  }
  std::string path_, key_;
  const YAML::Node& node_;
  bool found_ = false;
};

// Lists the field names of a section (for "unknown key" messages).
class KeyLister : public FieldVisitor {
 public:
  std::vector<std::string> keys;
  void integer(std::string_view k, int64_t&, int64_t, int64_t, std::string_view) override { keys.emplace_back(k); }
  void real(std::string_view k, double&, double, double, std::string_view) override { keys.emplace_back(k); }
  void boolean(std::string_view k, bool&, std::string_view) override { keys.emplace_back(k); }
  void text(std::string_view k, std::string&, std::vector<std::string_view>, std::string_view) override { keys.emplace_back(k); }
  void integers(std::string_view k, std::vector<int64_t>&, int64_t, int64_t, std::string_view) override { keys.emplace_back(k); }
};

class JsonWriter : public FieldVisitor {
 public:
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  void integer(std::string_view k, int64_t& v, int64_t, int64_t, std::string_view) override { out[std::string(k)] = v; }
  void real(std::string_view k, double& v, double, double, std::string_view) override { out[std::string(k)] = v; }
  void boolean(std::string_view k, bool& v, std::string_view) override { out[std::string(k)] = v; }
  void text(std::string_view k, std::string& v, std::vector<std::string_view>, std::string_view) override { out[std::string(k)] = v; }
  void integers(std::string_view k, std::vector<int64_t>& v, int64_t, int64_t, std::string_view) override { out[std::string(k)] = v; }
};

using SectionVisit = std::function<void(FieldVisitor&)>;

// Sets section.key from node, or throws naming the unknown section or key.
void set_field(Config& config, const std::string& section, const std::string& key, const YAML::Node& node) {
  bool section_found = false;
  std::vector<std::string> sections;
  config.for_each_section([&](std::string_view name, const SectionVisit& visit) {
    sections.emplace_back(name);
    if (name != section) return;
    section_found = true;
    NodeSetter setter(section, key, node);
    visit(setter);
    if (!setter.found()) {
      KeyLister lister;
      visit(lister);
      fail(section + "." + key, scalar_text(node),
           fmt::format("unknown key; section '{}' has: {}", section, fmt::join(lister.keys, ", ")));
    }
  });
  if (!section_found)
    fail(section + (key.empty() ? "" : "." + key), scalar_text(node),
         fmt::format("unknown section; sections are: {}", fmt::join(sections, ", ")));
}

void check_rule(bool ok, std::string_view key, const std::string& value, std::string_view rule) {
  if (!ok) fail(key, value, rule);
}

}  // namespace

void apply_yaml(Config& config, const std::string& yaml_text, const std::string& origin) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    throw ConfigError(fmt::format("{}: not valid YAML: {}", origin, e.what()));
  }
  if (root.IsNull()) return;
  if (!root.IsMap()) throw ConfigError(fmt::format("{}: the top level must be a mapping of sections", origin));
  for (const auto& section : root) {
    const std::string name = section.first.as<std::string>();
    if (section.second.IsNull()) continue;
    if (!section.second.IsMap()) {
      bool known = false;
      config.for_each_section([&](std::string_view n, const SectionVisit&) { known |= n == name; });
      if (!known) set_field(config, name, "", section.second);  // throws: unknown section
      fail(name, scalar_text(section.second), "must be a mapping of keys");
    }
    for (const auto& field : section.second) set_field(config, name, field.first.as<std::string>(), field.second);
  }
}

Config load_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(fmt::format("config file '{}' cannot be read", path));
  std::stringstream text;
  text << in.rdbuf();
  Config config;
  apply_yaml(config, text.str(), path);
  return config;
}

void apply_override(Config& config, const std::string& assignment) {
  const auto eq = assignment.find('=');
  const auto dot = assignment.find('.');
  if (eq == std::string::npos || dot == std::string::npos || dot > eq)
    throw ConfigError(fmt::format("override '{}': expected section.key=value", assignment));
  const std::string section = assignment.substr(0, dot);
  const std::string key = assignment.substr(dot + 1, eq - dot - 1);
  const std::string value = assignment.substr(eq + 1);
  YAML::Node node;
  try {
    node = YAML::Load(value);
  } catch (const YAML::Exception&) {
    node = YAML::Node(value);
  }
  if (node.IsNull()) node = YAML::Node(value);
  set_field(config, section, key, node);
}

Config config_from_json(const std::string& json_text, const std::string& origin) {
  Config config;
  apply_yaml(config, json_text, origin);  // JSON is YAML
  return config;
}

std::string Config::to_json() {
  nlohmann::ordered_json out = nlohmann::ordered_json::object();
  for_each_section([&](std::string_view name, const SectionVisit& visit) {
    JsonWriter writer;
    visit(writer);
    out[std::string(name)] = writer.out;
  });
  return out.dump(2);
}

void Config::validate() {
  for_each_section([&](std::string_view name, const SectionVisit& visit) {
    RangeChecker checker{std::string(name)};
    visit(checker);
  });
  const auto s = [](auto v) { return fmt::format("{}", v); };
  check_rule(model.n_heads % model.n_kv_heads == 0, "model.n_kv_heads", s(model.n_kv_heads),
             fmt::format("must divide model.n_heads = {}", model.n_heads));
  check_rule(model.head_dim > 0 || model.hidden % model.n_heads == 0, "model.hidden", s(model.hidden),
             fmt::format("must be divisible by model.n_heads = {} when model.head_dim = 0", model.n_heads));
  check_rule(model.resolved_head_dim() % 2 == 0, "model.head_dim", s(model.resolved_head_dim()),
             "must be even (RoPE rotates pairs)");
  check_rule(model.vocab_size >= 257, "model.vocab_size", s(model.vocab_size),
             "must be >= 257 (256 byte tokens + EOS of the byte tokenizer)");
  const int64_t chunk = 2 * parallel.cp * attention.block_size;
  check_rule(train.seq_len % chunk == 0, "train.seq_len", s(train.seq_len),
             fmt::format("must be divisible by 2 * parallel.cp * attention.block_size = 2 * {} * {} = {}", parallel.cp,
                         attention.block_size, chunk));
  check_rule(train.global_batch % (parallel.dp * train.micro_batch) == 0, "train.global_batch", s(train.global_batch),
             fmt::format("must be divisible by parallel.dp * train.micro_batch = {} * {}", parallel.dp,
                         train.micro_batch));
  if (attention.mode != "full")
    check_rule(attention.top_k >= 1, "attention.top_k", s(attention.top_k), "must be >= 1");
}

}  // namespace ssa::core
