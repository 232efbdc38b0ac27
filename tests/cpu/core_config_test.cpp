// Typed config: YAML loading, overrides, validation messages, JSON round trip.
#include <gtest/gtest.h>

#include <string>

#include "core/config.h"

using ssa::core::apply_override;
using ssa::core::apply_yaml;
using ssa::core::Config;
using ssa::core::ConfigError;

namespace {

// The message of the ConfigError thrown by fn, or "" if none was thrown.
template <class Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

std::string yaml_error(const std::string& yaml) {
  return error_of([&] {
    Config c;
    apply_yaml(c, yaml, "test.yaml");
    c.validate();
  });
}

std::string config_path(const std::string& name) { return std::string(SSA_SOURCE_DIR) + "/configs/" + name; }

}  // namespace

TEST(Config, TinyYamlIsTheBuiltInDefault) {
  Config defaults;
  Config tiny = ssa::core::load_config_file(config_path("tiny.yaml"));
  EXPECT_EQ(defaults.to_json(), tiny.to_json());
  EXPECT_NO_THROW(tiny.validate());
}

TEST(Config, ShippedConfigsValidate) {
  for (const char* name : {"paper-1b-8k.yaml", "1b-32k-cp.yaml"}) {
    Config c = ssa::core::load_config_file(config_path(name));
    EXPECT_NO_THROW(c.validate()) << name;
  }
  Config paper = ssa::core::load_config_file(config_path("paper-1b-8k.yaml"));
  EXPECT_EQ(paper.model.hidden, 2048);
  EXPECT_EQ(paper.model.n_kv_heads, 2);
  EXPECT_EQ(paper.model.vocab_size, 128256);
  EXPECT_DOUBLE_EQ(paper.model.rope_theta, 500000.0);
  Config long_ctx = ssa::core::load_config_file(config_path("1b-32k-cp.yaml"));
  EXPECT_EQ(long_ctx.train.seq_len, 32768);
  EXPECT_GT(long_ctx.parallel.cp, 1);
}

TEST(Config, UnknownKeyNamesKeyAndSection) {
  auto msg = yaml_error("model:\n  hiden: 3\n");
  EXPECT_NE(msg.find("'model.hiden'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("unknown key"), std::string::npos) << msg;
  EXPECT_NE(msg.find("hidden"), std::string::npos) << "should list the valid keys: " << msg;
  msg = yaml_error("modle:\n  hidden: 3\n");
  EXPECT_NE(msg.find("unknown section"), std::string::npos) << msg;
  EXPECT_NE(msg.find("modle"), std::string::npos) << msg;
}

TEST(Config, WrongTypesAreRejected) {
  auto msg = yaml_error("model:\n  hidden: wide\n");
  EXPECT_NE(msg.find("'model.hidden' = 'wide'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("integer"), std::string::npos) << msg;
  msg = yaml_error("model:\n  hidden: 2.5\n");
  EXPECT_NE(msg.find("integer"), std::string::npos) << msg;
  msg = yaml_error("optimizer:\n  lr: fast\n");
  EXPECT_NE(msg.find("'optimizer.lr' = 'fast'"), std::string::npos) << msg;
  msg = yaml_error("optimizer:\n  zero: maybe\n");
  EXPECT_NE(msg.find("true or false"), std::string::npos) << msg;
  msg = yaml_error("eval:\n  top_ks: [1, x]\n");
  EXPECT_NE(msg.find("eval.top_ks"), std::string::npos) << msg;
  msg = yaml_error("model: 5\n");
  EXPECT_NE(msg.find("mapping"), std::string::npos) << msg;
}

TEST(Config, OutOfRangeValuesNameTheRule) {
  auto msg = yaml_error("model:\n  n_layers: 0\n");
  EXPECT_NE(msg.find("'model.n_layers' = '0'"), std::string::npos) << msg;
  EXPECT_NE(msg.find(">= 1"), std::string::npos) << msg;
  msg = yaml_error("ssa:\n  full_probability: 1.5\n");
  EXPECT_NE(msg.find("ssa.full_probability"), std::string::npos) << msg;
  msg = yaml_error("attention:\n  mode: dense\n");
  EXPECT_NE(msg.find("one of ssa, full, sparse"), std::string::npos) << msg;
}

TEST(Config, ImpossibleCombinations) {
  auto msg = yaml_error("train:\n  seq_len: 250\n");
  EXPECT_NE(msg.find("'train.seq_len' = '250'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("2 * parallel.cp * attention.block_size"), std::string::npos) << msg;
  msg = yaml_error("parallel:\n  cp: 3\n");  // 256 % (2*3*16) != 0
  EXPECT_NE(msg.find("train.seq_len"), std::string::npos) << msg;
  msg = yaml_error("model:\n  n_heads: 8\n  n_kv_heads: 3\n");
  EXPECT_NE(msg.find("'model.n_kv_heads' = '3'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("divide model.n_heads"), std::string::npos) << msg;
  msg = yaml_error("parallel:\n  dp: 3\n");  // global_batch 8 % (3 * 4)
  EXPECT_NE(msg.find("train.global_batch"), std::string::npos) << msg;
  msg = yaml_error("model:\n  vocab_size: 100\n");
  EXPECT_NE(msg.find("model.vocab_size"), std::string::npos) << msg;
}

TEST(Config, OverridesApplyInOrderAndAreChecked) {
  Config c;
  apply_override(c, "train.steps=7");
  apply_override(c, "optimizer.lr=0.5");
  apply_override(c, "eval.top_ks=[1,2,3]");
  apply_override(c, "attention.mode=full");
  apply_override(c, "train.steps=9");
  EXPECT_EQ(c.train.steps, 9);
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 0.5);
  EXPECT_EQ(c.eval.top_ks, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(c.attention.mode, "full");
  EXPECT_NE(error_of([&] { apply_override(c, "train.stepz=1"); }).find("train.stepz"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_override(c, "trainsteps=1"); }).find("section.key=value"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_override(c, "train.steps=many"); }).find("integer"), std::string::npos);
}

TEST(Config, JsonRoundTrip) {
  Config c;
  apply_override(c, "model.rope_theta=123456.5");
  apply_override(c, "optimizer.eps=1e-12");
  apply_override(c, "data.path=some dir/x");
  const std::string json = c.to_json();
  Config back = ssa::core::config_from_json(json, "config.json");
  EXPECT_EQ(back.to_json(), json);
  EXPECT_DOUBLE_EQ(back.optimizer.eps, 1e-12);
  EXPECT_EQ(back.data.path, "some dir/x");
}
