// The Grafana dashboard reads only what the exporter really serves: every ssa_
// name in every PromQL query of monitoring/grafana-dashboard.json must appear in
// a live /metrics exposition (so counter suffixes are checked as the library
// writes them, not as we think it does), and every served metric has a panel.
#include <gtest/gtest.h>

#include <set>
#include <string>

#include "cpu/monitoring_test_support.h"
#include "monitoring/metrics_exporter.h"

namespace ssa::monitoring {
namespace {

using testing::collect_queries;
using testing::load_dashboard;
using testing::metric_names_in;

// Sample names of a live exposition after one step (with comm ops and a
// checkpoint) and one eval, so every family has a series and shows up.
std::set<std::string> exposed_names() {
  ExporterOptions options;
  options.port = 0;
  MetricsExporter exporter(options);
  EXPECT_TRUE(exporter.serving());
  StepRecord step;
  step.step = 1;
  step.full_passes = 1;
  step.comm_seconds = {{"all_reduce", 0.5}};
  step.checkpoint_seconds = 2.0;
  exporter.record_step(step);
  EvalRecord eval;
  eval.seq_len = 256;
  eval.top_k = 4;
  exporter.record_eval(eval);
  const auto response = testing::http_get(exporter.port(), "/metrics");
  EXPECT_EQ(response.status, 200);
  std::set<std::string> names;
  for (const auto& sample : testing::parse_samples(response.body)) names.insert(sample.name);
  return names;
}

TEST(GrafanaDashboard, HasADatasourceVariableUsedByEveryPanel) {
  const auto dashboard = load_dashboard();
  bool found = false;
  for (const auto& variable : dashboard.at("templating").at("list"))
    if (variable.at("name") == "datasource") {
      found = true;
      EXPECT_EQ(variable.at("type"), "datasource");
      EXPECT_EQ(variable.at("query"), "prometheus");
    }
  EXPECT_TRUE(found) << "no datasource template variable";
  int panels = 0;
  for (const auto& panel : dashboard.at("panels")) {
    if (panel.at("type") == "row") continue;
    ++panels;
    EXPECT_EQ(panel.at("datasource").at("uid"), "${datasource}") << panel.at("title");
    ASSERT_FALSE(panel.at("targets").empty()) << panel.at("title");
    for (const auto& target : panel.at("targets"))
      EXPECT_EQ(target.at("datasource").at("uid"), "${datasource}") << panel.at("title");
  }
  EXPECT_GE(panels, 11);
}

TEST(GrafanaDashboard, EveryQueryUsesOnlyServedMetrics) {
  std::vector<std::string> queries;
  collect_queries(load_dashboard(), queries);
  ASSERT_GE(queries.size(), 20u);
  const std::set<std::string> exposed = exposed_names();
  const auto& list = MetricsExporter::served_metric_names();
  const std::set<std::string> served(list.begin(), list.end());
  std::set<std::string> used;
  for (const std::string& query : queries) {
    const auto names = metric_names_in(query);
    EXPECT_FALSE(names.empty()) << "query reads no ssa_ metric: " << query;
    for (const std::string& name : names) {
      EXPECT_TRUE(exposed.count(name)) << name << " (in " << query << ") is not in the /metrics exposition";
      EXPECT_TRUE(served.count(name)) << name << " (in " << query << ") is not in served_metric_names()";
      used.insert(name);
    }
  }
  for (const std::string& name : served) EXPECT_TRUE(used.count(name)) << name << " is served but on no panel";
  // The check can fail: a counter named without its real suffix is caught.
  for (const std::string& name : metric_names_in("rate(ssa_forward_passes[5m]) + ssa_comm_seconds"))
    EXPECT_FALSE(exposed.count(name)) << name;
}

}  // namespace
}  // namespace ssa::monitoring
