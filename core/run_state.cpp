#include "core/run_state.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <stdexcept>

namespace ssa::core {

std::string run_state_to_json(const RunState& s) {
  nlohmann::ordered_json j;
  j["step"] = s.step;
  j["tokens_seen"] = s.tokens_seen;
  j["data_cursor"] = {{"step", s.data_step}};
  j["skipped_steps"] = s.skipped_steps;
  j["grid"] = {{"dp", s.dp}, {"cp", s.cp}};
  j["rng"] = {{"seed", s.seed}, {"mode_draw", "splitmix64(seed, step, micro_batch, dp_rank)"}};
  j["config"] = nlohmann::ordered_json::parse(s.config_json);
  return j.dump(2);
}

RunState run_state_from_json(const std::string& text, const std::string& origin) {
  try {
    auto j = nlohmann::json::parse(text);
    RunState s;
    s.step = j.at("step").get<int64_t>();
    s.tokens_seen = j.at("tokens_seen").get<int64_t>();
    s.data_step = j.at("data_cursor").at("step").get<int64_t>();
    s.skipped_steps = j.at("skipped_steps").get<int64_t>();
    s.dp = j.at("grid").at("dp").get<int64_t>();
    s.cp = j.at("grid").at("cp").get<int64_t>();
    s.seed = j.at("rng").at("seed").get<uint64_t>();
    s.config_json = j.at("config").dump();
    return s;
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(fmt::format("{}: not a valid checkpoint state ({})", origin, e.what()));
  }
}

namespace {

// Collects section.key -> printed value of every field.
class FieldCollector : public FieldVisitor {
 public:
  explicit FieldCollector(std::string section) : section_(std::move(section)) {}
  std::vector<std::pair<std::string, std::string>> values;
  void integer(std::string_view k, int64_t& v, int64_t, int64_t, std::string_view) override { add(k, fmt::format("{}", v)); }
  void real(std::string_view k, double& v, double, double, std::string_view) override { add(k, fmt::format("{}", v)); }
  void boolean(std::string_view k, bool& v, std::string_view) override { add(k, v ? "true" : "false"); }
  void text(std::string_view k, std::string& v, std::vector<std::string_view>, std::string_view) override { add(k, v); }
  void integers(std::string_view k, std::vector<int64_t>& v, int64_t, int64_t, std::string_view) override {
    add(k, fmt::format("{}", fmt::join(v, ",")));
  }

 private:
  void add(std::string_view k, std::string v) { values.emplace_back(section_ + "." + std::string(k), std::move(v)); }
  std::string section_;
};

std::vector<std::pair<std::string, std::string>> all_fields(Config& c) {
  std::vector<std::pair<std::string, std::string>> out;
  c.for_each_section([&](std::string_view name, const auto& visit) {
    FieldCollector collector{std::string(name)};
    visit(collector);
    out.insert(out.end(), collector.values.begin(), collector.values.end());
  });
  return out;
}

bool must_match(const std::string& key) {
  static const char* fixed_keys[] = {"train.seq_len", "train.global_batch", "train.seed", "data.path",
                                     "attention.block_size", "attention.mode"};
  if (key.rfind("model.", 0) == 0) return true;
  for (const char* k : fixed_keys)
    if (key == k) return true;
  return false;
}

}  // namespace

void check_resume_compatible(Config& saved, Config& requested, const std::string& checkpoint) {
  auto before = all_fields(saved);
  auto after = all_fields(requested);
  for (size_t i = 0; i < before.size(); ++i) {
    if (!must_match(before[i].first) || before[i].second == after[i].second) continue;
    throw ConfigError(fmt::format(
        "config key '{}' = '{}': the run resumes from {}, which was trained with {} = '{}'; this key cannot change "
        "on resume (use a new run folder)",
        after[i].first, after[i].second, checkpoint, before[i].first, before[i].second));
  }
}

}  // namespace ssa::core
