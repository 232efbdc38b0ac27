#pragma once
// AdamW (decoupled weight decay, PyTorch's update rule and bias correction) with
// fp32 master weights and global-norm clipping, over data-parallel replicas and
// context-parallel ranks, optionally ZeRO-sharded over dp (or, from
// for_grid, over dp x cp).
//
// Gradients: each rank's loss is the mean over its own tokens (its micro-batch
// rows and, with cp, its zigzag chunks; the ring attention's backward already
// routes every rank's loss into the K/V gradients of the ranks that own them).
// All ranks hold equally many tokens, so the gradient of the global mean loss is
// the MEAN of the per-rank gradients over all dp * cp ranks: averaged over dp
// (reduce-scatter or all-reduce) and then over cp.
//
// Parameters are flattened into one index space (FlatLayout) in buckets. ZeRO
// (zero = true): each bucket's fp32 gradients are reduce-scattered over dp, each
// rank updates only its 1/dp of the master weights and moments, and the new
// weights are all-gathered back into the model's parameters. Without ZeRO the
// gradients are all-reduced and every rank updates everything.
//
// A step whose global gradient norm is not finite changes nothing (applied =
// false, the step count does not advance); every rank reaches the same verdict.
//
// The update is PyTorch's fused AdamW kernel over my shard (one launch per
// bucket and weight-decay group). Clipping and the non-finite verdict are
// decided on the device, so launch_step() enqueues a whole step without waiting
// for it; finish_step() reads the verdict and the norm back (the one wait, for
// their copy to the host, queued before the update: the host goes on, e.g. to
// queue the next step, while the update runs).
#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/flat_layout.h"
#include "parallel/host_copy.h"
#include "parallel/process_grid.h"

namespace ssa::parallel {

struct Parameter {
  std::string name;
  at::Tensor tensor;  // leaf, contiguous, model dtype (fp32 or bf16); all on one device
  bool decay = true;  // weight decay applies
};

struct AdamWOptions {
  double lr = 1e-3;            // default lr (step(lr) passes the scheduled one)
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;   // decoupled: p -= lr * weight_decay * p
  double grad_clip = 1.0;      // max global L2 norm; <= 0 disables clipping
  bool zero = true;            // shard master weights and moments over dp
  int64_t bucket_numel = int64_t{1} << 25;  // elements per gradient bucket (fp32 buffer of 128 MiB)
};

struct StepResult {
  double grad_norm = 0;  // global L2 norm of the averaged gradient, before clipping
  bool applied = false;  // false: the norm was not finite and nothing changed
};

// One contiguous range of the flat parameter space with its optimizer state
// (fp32, 1-D, on the CPU). Shards written at any dp can be imported at any dp.
struct ShardState {
  int64_t offset = 0;
  int64_t numel = 0;
  at::Tensor master;
  at::Tensor exp_avg;
  at::Tensor exp_avg_sq;
};

class ShardedAdamW {
 public:
  // dp_group / cp_group: nullptr means a group of one. Copies the parameters'
  // current values into the fp32 master weights (of my shard).
  ShardedAdamW(std::vector<Parameter> params, AdamWOptions options, Communicator* dp_group, Communicator* cp_group);
  ~ShardedAdamW();
  // The optimizer of a process grid. With ZeRO and cp > 1 it shards over every
  // rank of the grid: the cp ranks of a replica hold the same parameters and
  // their gradients enter the mean like dp ranks' do, so the whole grid acts as
  // the dp group (reduce-scatter over dp x cp ranks, 1 / (dp * cp) of the state
  // each). Otherwise over dp, with the mean taken over cp too.
  static std::unique_ptr<ShardedAdamW> for_grid(std::vector<Parameter> params, AdamWOptions options,
                                                ProcessGrid& grid);
  // Whether the cp ranks of a replica hold different shards (for_grid with ZeRO
  // and cp > 1): each rank then saves its own.
  bool shards_over_cp() const { return shards_over_cp_; }

  // Averages the gradients (param.grad(); undefined counts as zero), clips,
  // updates, and writes the new weights into the parameters. Collective over dp
  // and cp. `skip` (optional, one element on the parameters' device): non-zero
  // on any rank skips the step on every rank (e.g. a non-finite loss).
  // Enqueued only: call finish_step() before the next launch_step().
  void launch_step(double lr, const at::Tensor& skip = at::Tensor());
  // Waits for the launched step; its norm and whether it was applied.
  StepResult finish_step();
  StepResult step(double lr) {
    launch_step(lr);
    return finish_step();
  }
  StepResult step() { return step(options_.lr); }
  void zero_grad();  // releases the parameters' gradients (set to none)

  // Reduces the gradients of the next backward while it runs: each bucket's
  // reduction starts on the communication stream as soon as its last gradient
  // has arrived, from the last bucket to the first (the order a backward
  // produces them), and the backward goes on computing. Call it before the
  // backward that completes the step's gradients (the last micro-batch's);
  // the next launch_step() starts what is left and waits for the rest. The
  // previous step may be launched and not finished yet (its reductions are
  // taken). Reductions are started in the same bucket order on every rank.
  void reduce_during_next_backward();
  // Buckets of the last overlapped step whose reduction started during the
  // backward (the rest started in launch_step), and the bucket count.
  int64_t overlapped_buckets() const { return overlapped_buckets_; }
  int64_t bucket_count() const { return static_cast<int64_t>(layout_->buckets().size()); }

  // My shards (with ZeRO: my 1/n of every bucket, n the ranks sharing them;
  // without: everything on dp rank 0 and nothing elsewhere, so the union over dp
  // ranks covers the range once).
  std::vector<ShardState> export_state() const;
  // Shards from any dp size that together cover [0, numel()) exactly once.
  // Collective (refreshes the parameters from the imported master weights).
  void import_state(const std::vector<ShardState>& shards, int64_t step);

  int64_t step_count() const { return step_; }
  int64_t numel() const { return layout_->numel(); }
  const AdamWOptions& options() const { return options_; }
  const std::vector<Parameter>& parameters() const { return params_; }

  // Bytes per parameter on this rank: the model's weights and gradients (model
  // dtype) plus the optimizer tensors actually allocated (fp32 master and two
  // moments of my shard, padding included), divided by numel().
  double bytes_per_parameter() const;
  // ZeRO formula: 2 * model bytes (weights + grads) + (4 + 8) / (zero ? dp : 1).
  double zero_formula_bytes_per_parameter() const;

 private:
  struct BucketState {
    at::Tensor master;      // fp32 [shard_numel] (ZeRO) or [numel] (replicated)
    at::Tensor exp_avg;
    at::Tensor exp_avg_sq;
  };
  // A run of my owned range, in state coordinates, whose parameters share the
  // weight-decay setting: one tensor of a fused update's lists.
  struct DecayRun {
    int64_t offset = 0;
    int64_t numel = 0;
    bool decay = true;
  };
  // Gradient reduction per bucket (during the backward with reduce_during_next_backward,
  // else in launch_step from .grad).
  struct Reduction {
    at::Tensor buffer;     // fp32 [padded], padding zero; kept between steps when reduced during the backward
    at::Tensor reduced;    // my part of it, reduced over dp (and cp) when complete
    int64_t missing = 0;   // pieces whose gradient has not arrived
    P2PBatch dp_flight, cp_flight;
  };
  void arm_reductions();  // every bucket waits for all its gradients
  void on_gradient(size_t param, const at::Tensor& grad);
  void start_reductions(bool all);  // the complete ones in order; all: the rest too
  std::vector<at::Tensor> finish_reductions();  // each bucket's reduced gradient
  void write_parameters();  // master -> params (all-gather with ZeRO)
  // One bucket of write_parameters: its weights in the gather dtype, and with
  // ZeRO their all-gather, in flight until finish_weight_gather copies them out.
  struct WeightGather {
    at::Tensor own, full;
    P2PBatch batch;
  };
  WeightGather start_weight_gather(size_t bucket);
  void finish_weight_gather(size_t bucket, WeightGather& g);
  bool sharded() const { return options_.zero && dp_size_ > 1; }
  // Offset of my state within the bucket's coordinates (0 without ZeRO).
  int64_t state_origin(const FlatBucket& b) const { return sharded() ? b.shard_numel * dp_rank_ : 0; }

  std::vector<Parameter> params_;
  at::ScalarType gather_type_ = at::kFloat;  // dtype of the weights' all-gather
  AdamWOptions options_;
  bool shards_over_cp_ = false;
  Communicator* dp_ = nullptr;
  Communicator* cp_ = nullptr;
  int64_t dp_size_ = 1, dp_rank_ = 0;
  std::unique_ptr<FlatLayout> layout_;
  std::vector<BucketState> state_;
  std::vector<std::vector<DecayRun>> runs_;  // per bucket
  std::vector<Reduction> reductions_;        // per bucket
  std::vector<std::vector<std::pair<size_t, FlatPiece>>> param_pieces_;  // per parameter: (bucket, piece)
  std::vector<uint8_t> arrived_;             // per parameter, during an overlapped backward
  std::vector<std::pair<at::Tensor, unsigned>> hooks_;  // (parameter, hook handle)
  bool overlap_armed_ = false;
  size_t next_start_ = 0;                    // reductions started (last bucket first)
  int64_t overlapped_buckets_ = 0;
  int64_t step_ = 0;
  at::Tensor device_step_;   // fp32 [1]: the step count the fused kernel reads
  // The launched step's verdict {norm^2, skipped}, on its way to the host (queued
  // before the update, so finish_step does not wait for the update itself).
  HostCopy pending_verdict_;
  at::Device device_{at::kCPU};
};

}  // namespace ssa::parallel
