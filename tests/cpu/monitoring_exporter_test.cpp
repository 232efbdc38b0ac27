// The Prometheus exporter, scraped over real HTTP on loopback: values and labels
// of what was recorded, counters accumulating, eval series, and a port that
// cannot be bound giving one warning and a disabled exporter instead of a throw.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <string>

#include "cpu/monitoring_test_support.h"
#include "monitoring/metrics_exporter.h"

namespace ssa::monitoring {
namespace {

using testing::http_get;
using testing::parse_samples;
using testing::Sample;

ExporterOptions loopback_options(int port = 0) {
  ExporterOptions options;
  options.port = port;
  options.job = "unit";
  options.rank = 3;
  options.dp_rank = 1;
  options.cp_rank = 1;
  options.host = "node-a";
  return options;
}

std::vector<Sample> scrape(const MetricsExporter& exporter) {
  const auto response = http_get(exporter.port(), "/metrics");
  EXPECT_EQ(response.status, 200) << "GET " << exporter.endpoint();
  return parse_samples(response.body);
}

// The one sample of name whose labels include `labels`; fails if not exactly one.
double value_of(const std::vector<Sample>& samples, const std::string& name,
                 const std::map<std::string, std::string>& labels = {}) {
  std::vector<double> found;
  for (const Sample& s : samples) {
    if (s.name != name) continue;
    bool match = true;
    for (const auto& [k, v] : labels) match = match && s.labels.count(k) && s.labels.at(k) == v;
    if (match) found.push_back(s.value);
  }
  EXPECT_EQ(found.size(), 1u) << name << " with " << labels.size() << " labels";
  return found.empty() ? std::nan("") : found.front();
}

// The text format prints doubles with enough digits for 1e-12 relative.
void expect_value(const std::vector<Sample>& samples, const std::string& name, double expected,
                  const std::map<std::string, std::string>& labels = {}) {
  const double got = value_of(samples, name, labels);
  EXPECT_NEAR(got, expected, 1e-12 * std::max(1.0, std::fabs(expected))) << name;
}

StepRecord first_step() {
  StepRecord r;
  r.step = 7;
  r.total_steps = 1000;
  r.tokens_seen = 7 * 4096;
  r.loss = 3.25;
  r.ce_loss = 3.125;
  r.sparsity_loss = 0.0075;
  r.commitment_loss = 0.005;
  r.mode = "mixed";
  r.full_passes = 3;
  r.sparse_passes = 1;
  r.lr = 6e-4;
  r.grad_norm = 0.875;
  r.step_seconds = 1.5;
  r.tokens_per_second = 2730.5;
  r.mfu = 0.41;
  r.data_wait_seconds = 0.0125;
  r.comm_seconds = {{"all_reduce", 0.25}, {"send_recv", 0.5}};
  r.gpu_memory_bytes = 40LL << 30;
  r.skipped_steps = 2;
  r.checkpoint_seconds = 4.75;
  r.eta_seconds = 3600;
  return r;
}

TEST(MetricsExporter, ServesRecordedValuesWithConstantLabelsOnly) {
  MetricsExporter exporter(loopback_options());
  ASSERT_TRUE(exporter.serving());
  ASSERT_GT(exporter.port(), 0);
  EXPECT_EQ(exporter.endpoint(), "http://127.0.0.1:" + std::to_string(exporter.port()) + "/metrics");

  StepRecord r = first_step();
  exporter.record_step(r);
  // Second step: gauges take the new values, counters add to the old ones, and a
  // step without a checkpoint leaves the last checkpoint time shown.
  r.step = 8;
  r.loss = 3.0;
  r.full_passes = 0;
  r.sparse_passes = 4;
  r.comm_seconds = {{"all_reduce", 0.125}, {"reduce_scatter", 2.0}};
  r.checkpoint_seconds.reset();
  exporter.record_step(r);

  const auto samples = scrape(exporter);
  expect_value(samples, "ssa_step", 8);
  expect_value(samples, "ssa_total_steps", 1000);
  expect_value(samples, "ssa_tokens_seen", 7 * 4096);
  expect_value(samples, "ssa_loss", 3.0);
  expect_value(samples, "ssa_ce_loss", 3.125);
  expect_value(samples, "ssa_sparsity_loss", 0.0075);
  expect_value(samples, "ssa_commitment_loss", 0.005);
  expect_value(samples, "ssa_learning_rate", 6e-4);
  expect_value(samples, "ssa_grad_norm", 0.875);
  expect_value(samples, "ssa_step_seconds", 1.5);
  expect_value(samples, "ssa_tokens_per_second", 2730.5);
  expect_value(samples, "ssa_mfu", 0.41);
  expect_value(samples, "ssa_data_wait_seconds", 0.0125);
  expect_value(samples, "ssa_gpu_memory_bytes", static_cast<double>(40LL << 30));
  expect_value(samples, "ssa_skipped_steps", 2);
  expect_value(samples, "ssa_checkpoint_seconds", 4.75);
  expect_value(samples, "ssa_eta_seconds", 3600);
  expect_value(samples, "ssa_forward_passes_total", 3, {{"mode", "full"}});
  expect_value(samples, "ssa_forward_passes_total", 5, {{"mode", "sparse"}});
  expect_value(samples, "ssa_comm_seconds_total", 0.375, {{"op", "all_reduce"}});
  expect_value(samples, "ssa_comm_seconds_total", 0.5, {{"op", "send_recv"}});
  expect_value(samples, "ssa_comm_seconds_total", 2.0, {{"op", "reduce_scatter"}});

  // Every ssa_ series carries exactly the constant labels (plus its own label
  // mode/op), and never the step.
  int ssa_samples = 0;
  for (const Sample& s : samples) {
    if (s.name.rfind("ssa_", 0) != 0) continue;
    ++ssa_samples;
    EXPECT_EQ(s.labels.at("job"), "unit") << s.name;
    EXPECT_EQ(s.labels.at("rank"), "3") << s.name;
    EXPECT_EQ(s.labels.at("dp_rank"), "1") << s.name;
    EXPECT_EQ(s.labels.at("cp_rank"), "1") << s.name;
    EXPECT_EQ(s.labels.at("host"), "node-a") << s.name;
    EXPECT_EQ(s.labels.count("step"), 0u) << s.name;
    const size_t own = s.name == "ssa_forward_passes_total" || s.name == "ssa_comm_seconds_total" ? 1 : 0;
    EXPECT_EQ(s.labels.size(), 5 + own) << s.name;
  }
  EXPECT_EQ(ssa_samples, 19 + 2 + 3);  // gauges + passes by mode + comm by op
}

TEST(MetricsExporter, GaugesAppearWithTheirFirstValue) {
  MetricsExporter exporter(loopback_options());
  ASSERT_TRUE(exporter.serving());
  auto names = [&] {
    std::set<std::string> found;
    for (const Sample& s : scrape(exporter)) found.insert(s.name);
    return found;
  };
  // Before the first step: no made-up loss, but the pass counters at 0 (so a
  // rate() has its starting point).
  std::set<std::string> before = names();
  EXPECT_EQ(before.count("ssa_loss"), 0u);
  EXPECT_EQ(before.count("ssa_step"), 0u);
  expect_value(scrape(exporter), "ssa_forward_passes_total", 0, {{"mode", "full"}});
  expect_value(scrape(exporter), "ssa_forward_passes_total", 0, {{"mode", "sparse"}});
  StepRecord r = first_step();
  r.checkpoint_seconds.reset();
  exporter.record_step(r);
  const std::set<std::string> after = names();
  EXPECT_EQ(after.count("ssa_loss"), 1u);
  EXPECT_EQ(after.count("ssa_checkpoint_seconds"), 0u);  // no checkpoint written yet
  r.checkpoint_seconds = 1.25;
  exporter.record_step(r);
  expect_value(scrape(exporter), "ssa_checkpoint_seconds", 1.25);
}

TEST(MetricsExporter, EvalSeriesAreLabelledByLengthAndBudget) {
  MetricsExporter exporter(loopback_options());
  ASSERT_TRUE(exporter.serving());
  EvalRecord e;
  e.step = 100;
  e.seq_len = 1024;
  e.full_perplexity = 12.5;
  for (int top_k : {4, 8}) {
    e.top_k = top_k;
    e.sparse_perplexity = 20.0 - top_k;
    e.sparsity = 0.5 + 0.05 * top_k;
    e.entropy_bits = 7.25;
    exporter.record_eval(e);
  }
  const auto samples = scrape(exporter);
  for (int top_k : {4, 8}) {
    const std::map<std::string, std::string> labels{{"seq_len", "1024"}, {"top_k", std::to_string(top_k)}};
    expect_value(samples, "ssa_eval_sparse_perplexity", 20.0 - top_k, labels);
    expect_value(samples, "ssa_eval_attention_sparsity", 0.5 + 0.05 * top_k, labels);
    expect_value(samples, "ssa_eval_attention_entropy_bits", 7.25, labels);
  }
  expect_value(samples, "ssa_eval_full_perplexity", 12.5, {{"seq_len", "1024"}});
  int full = 0;
  for (const Sample& s : samples) full += s.name == "ssa_eval_full_perplexity";
  EXPECT_EQ(full, 1);  // one series per length, not one per budget
}

TEST(MetricsExporter, NanLossIsShownButNeverAddedToCounters) {
  MetricsExporter exporter(loopback_options());
  ASSERT_TRUE(exporter.serving());
  StepRecord r = first_step();
  exporter.record_step(r);
  r.loss = std::nan("");
  r.comm_seconds = {{"all_reduce", std::nan("")}, {"send_recv", -1.0}};
  r.full_passes = -2;
  exporter.record_step(r);
  const auto samples = scrape(exporter);
  EXPECT_TRUE(std::isnan(value_of(samples, "ssa_loss")));
  expect_value(samples, "ssa_comm_seconds_total", 0.25, {{"op", "all_reduce"}});
  expect_value(samples, "ssa_comm_seconds_total", 0.5, {{"op", "send_recv"}});
  expect_value(samples, "ssa_forward_passes_total", 3, {{"mode", "full"}});
}

TEST(MetricsExporter, EveryServedNameIsExposed) {
  MetricsExporter exporter(loopback_options());
  ASSERT_TRUE(exporter.serving());
  exporter.record_step(first_step());
  EvalRecord e;
  e.seq_len = 256;
  e.top_k = 2;
  exporter.record_eval(e);
  std::set<std::string> exposed;
  for (const Sample& s : scrape(exporter))
    if (s.name.rfind("ssa_", 0) == 0) exposed.insert(s.name);
  const auto& served = MetricsExporter::served_metric_names();
  EXPECT_EQ(exposed, std::set<std::string>(served.begin(), served.end()));
  EXPECT_EQ(served.size(), exposed.size());  // no name listed twice
}

TEST(MetricsExporter, PortInUseWarnsOnceAndDisables) {
  MetricsExporter first(loopback_options());
  ASSERT_TRUE(first.serving());
  ::testing::internal::CaptureStderr();
  MetricsExporter second(loopback_options(first.port()));
  second.record_step(first_step());  // disabled: nothing happens, nothing throws
  second.record_eval(EvalRecord{});
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_FALSE(second.serving());
  EXPECT_EQ(second.port(), -1);
  EXPECT_EQ(second.endpoint(), "");
  EXPECT_NE(err.find("warning"), std::string::npos) << err;
  EXPECT_NE(err.find("127.0.0.1:" + std::to_string(first.port())), std::string::npos) << err;
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  // The first exporter is untouched.
  EXPECT_EQ(http_get(first.port(), "/metrics").status, 200);
}

TEST(MetricsExporter, BadAddressOrPortWarnsAndDisables) {
  for (const auto& [bind, port] : std::vector<std::pair<std::string, int>>{
           {"256.1.1.1", 0}, {"not-an-address", 0}, {"127.0.0.1", 70000}, {"127.0.0.1", -1}}) {
    ExporterOptions options = loopback_options(port);
    options.bind = bind;
    ::testing::internal::CaptureStderr();
    MetricsExporter exporter(options);
    exporter.record_step(first_step());
    const std::string err = ::testing::internal::GetCapturedStderr();
    EXPECT_FALSE(exporter.serving()) << bind << ":" << port;
    EXPECT_NE(err.find("warning"), std::string::npos) << bind << ":" << port << " -> " << err;
    EXPECT_NE(err.find(bind), std::string::npos) << err;
  }
}

TEST(MetricsExporter, DisabledServesNothingSilently) {
  ExporterOptions options = loopback_options();
  options.enabled = false;
  ::testing::internal::CaptureStderr();
  MetricsExporter exporter(options);
  exporter.record_step(first_step());
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
  EXPECT_FALSE(exporter.serving());
  EXPECT_EQ(exporter.port(), -1);
}

TEST(MetricsExporter, RanksServeSeparatePorts) {
  ExporterOptions a = loopback_options();
  ExporterOptions b = loopback_options();
  a.rank = 0;
  b.rank = 1;
  MetricsExporter rank0(a), rank1(b);
  ASSERT_TRUE(rank0.serving() && rank1.serving());
  ASSERT_NE(rank0.port(), rank1.port());
  StepRecord r = first_step();
  rank0.record_step(r);
  r.loss = 9.5;
  rank1.record_step(r);
  expect_value(scrape(rank0), "ssa_loss", 3.25, {{"rank", "0"}});
  expect_value(scrape(rank1), "ssa_loss", 9.5, {{"rank", "1"}});
}

}  // namespace
}  // namespace ssa::monitoring
