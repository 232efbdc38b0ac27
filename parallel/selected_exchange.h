#pragma once
// Sparse-only context parallelism without the ring: each rank fetches from the
// owners only the K/V blocks its queries selected, and in backward returns their
// fp32 gradients to the owners. The plan comes from every rank's selection
// bitmask (all-gathered), so every rank knows every transfer and all agree on
// whether this moves fewer bytes than the ring.
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/zigzag.h"

namespace ssa::parallel {

struct SelectedPlan {
  ZigzagLayout layout;
  int64_t block_size = 0;
  int64_t blocks_per_chunk = 0;
  // recv_blocks[o]: global ids (ascending) of owner o's blocks my queries selected;
  // the compact K/V buffer holds them owner by owner in this order.
  std::vector<std::vector<int64_t>> recv_blocks;
  // send_blocks[r]: my blocks that rank r's queries selected.
  std::vector<std::vector<int64_t>> send_blocks;
  int64_t compact_blocks = 0;
  at::Tensor compact_index;  // int32 [Nb] on the device: global id -> compact block, -1 when not fetched
  // Rows (tokens) moved by the whole cp group in the forward pass, each way.
  int64_t group_selected_rows = 0;
  int64_t group_ring_rows = 0;
  int64_t my_selected_rows = 0;  // rows this rank sends
};

// masks: [cp, Nb] (any integer dtype, any device): masks[r][b] != 0 when rank
// r's queries selected global block b.
SelectedPlan plan_selected(const at::Tensor& masks, const ZigzagLayout& layout, int64_t block_size,
                           const at::Device& device);

// Whether fetching the selected blocks moves fewer bytes over the group than
// the ring (forward only, or forward and backward when gradients are needed).
bool selected_blocks_win(const SelectedPlan& plan, int64_t kv_element_size, bool with_backward);

// Rows of my local K/V (dim 1) holding `blocks` (mine), block by block.
at::Tensor local_rows(const SelectedPlan& plan, const std::vector<int64_t>& blocks, const at::Device& device);

// Sends my blocks to the ranks that selected them and receives mine:
// k, v [B, 2c, Hkv, D] -> compact k, v [B, compact_blocks * block_size, Hkv, D].
std::pair<at::Tensor, at::Tensor> fetch_selected(Communicator& comm, const SelectedPlan& plan, const at::Tensor& k,
                                                 const at::Tensor& v);

// Backward: sends the gradients of the compact blocks to their owners and adds
// the gradients other ranks computed for my blocks into dk, dv [B, 2c, Hkv, D].
void return_selected_grads(Communicator& comm, const SelectedPlan& plan, const at::Tensor& dk_compact,
                           const at::Tensor& dv_compact, at::Tensor& dk, at::Tensor& dv);

// block_ids [B, Sq, Hkv, K] global ids -> compact ids of the fetched blocks,
// ascending with -1 after them (my own blocks become -1: computed locally).
at::Tensor compact_block_ids(const SelectedPlan& plan, const at::Tensor& block_ids);

}  // namespace ssa::parallel
