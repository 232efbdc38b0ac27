#pragma once
// Prometheus exporter: each rank serves its metrics over HTTP (prometheus-cpp's
// pull Exposer) at http://<bind>:<port>/metrics, port = base_port + local_rank.
//
// A metrics failure never stops a run: if the port cannot be bound (in use, bad
// address, out of range) one warning goes to stderr and the exporter keeps going
// with metrics disabled. Neither the constructor nor the record methods throw.
//
// Every series carries the constant labels job, rank, dp_rank, cp_rank and host
// (never the step: one series per rank, not per step). Scrape with
// `honor_labels: true`, otherwise Prometheus renames our `job` to `exported_job`.
#include <memory>
#include <string>
#include <vector>

#include "monitoring/step_record.h"

namespace ssa::monitoring {

struct ExporterOptions {
  bool enabled = true;             // false: serve nothing; record_* do nothing
  std::string bind = "127.0.0.1";  // listen address; loopback by default (IPv6 as ::1 or [::1])
  int port = 9400;                 // 0 picks a free port (see port())
  // Constant labels of every series.
  std::string job = "ssa";
  int rank = 0;
  int dp_rank = 0;
  int cp_rank = 0;
  std::string host;                // empty: this machine's hostname
};

class MetricsExporter {
 public:
  explicit MetricsExporter(const ExporterOptions& options);
  ~MetricsExporter();
  MetricsExporter(const MetricsExporter&) = delete;
  MetricsExporter& operator=(const MetricsExporter&) = delete;

  // Gauges take the record's values; counters add this step's forward passes
  // (by mode) and this step's comm seconds (by op). Non-finite values are shown
  // as they are on gauges (a NaN loss is visible) and never added to counters.
  // A gauge series appears with its first value (no 0 loss before step 1, no
  // checkpoint time before the first checkpoint); the forward-pass counters
  // are there from the start, at 0.
  void record_step(const StepRecord& record);
  // Eval gauges labelled by seq_len (and top_k where the value depends on it).
  void record_eval(const EvalRecord& record);

  bool serving() const;          // the HTTP endpoint is up and metrics are recorded
  int port() const;              // the bound port (the real one when asked for 0); -1 if not serving
  std::string endpoint() const;  // "http://127.0.0.1:9400/metrics"; empty if not serving

  // The metric family names this exporter serves, as they appear in /metrics.
  static const std::vector<std::string>& served_metric_names();

 private:
  struct State;
  std::unique_ptr<State> state_;  // null when metrics are disabled
  std::string bind_;
  int port_ = -1;
  std::string endpoint_;
};

}  // namespace ssa::monitoring
