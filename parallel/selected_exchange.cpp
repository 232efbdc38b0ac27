#include "parallel/selected_exchange.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <climits>

#include "parallel/error_check.h"

namespace ssa::parallel {
namespace {

constexpr int kTagSelectedKv = 3;
constexpr int kTagSelectedGrad = 4;

}  // namespace

SelectedPlan plan_selected(const at::Tensor& masks, const ZigzagLayout& layout, int64_t block_size,
                           const at::Device& device) {
  SelectedPlan plan;
  plan.layout = layout;
  plan.block_size = block_size;
  plan.blocks_per_chunk = layout.chunk / block_size;
  const int64_t cp = layout.cp;
  const int64_t nb = layout.chunks() * plan.blocks_per_chunk;
  if (masks.dim() != 2 || masks.size(0) != cp || masks.size(1) != nb) {
    throw CommError(fmt::format("{}: selection masks must be [cp = {}, blocks = {}], got [{}]", process_location(), cp,
                                nb, fmt::join(masks.sizes(), ", ")));
  }
  const at::Tensor m = masks.to(at::kCPU).to(at::kByte).contiguous();
  const auto acc = m.accessor<uint8_t, 2>();
  plan.recv_blocks.assign(static_cast<size_t>(cp), {});
  plan.send_blocks.assign(static_cast<size_t>(cp), {});
  for (int64_t r = 0; r < cp; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      if (!acc[r][b]) continue;
      const int64_t owner = layout.owner(b / plan.blocks_per_chunk);
      if (owner == r) continue;  // computed where it lives
      plan.group_selected_rows += block_size;
      if (r == layout.rank) plan.recv_blocks[static_cast<size_t>(owner)].push_back(b);
      if (owner == layout.rank) plan.send_blocks[static_cast<size_t>(r)].push_back(b);
    }
  }
  plan.group_ring_rows = cp * (cp - 1) * 2 * layout.chunk;
  std::vector<int32_t> index(static_cast<size_t>(nb), -1);
  int32_t next = 0;
  for (const auto& blocks : plan.recv_blocks) {
    for (int64_t b : blocks) index[static_cast<size_t>(b)] = next++;
  }
  plan.compact_blocks = next;
  for (const auto& blocks : plan.send_blocks) plan.my_selected_rows += static_cast<int64_t>(blocks.size()) * block_size;
  plan.compact_index = at::tensor(index, at::TensorOptions().dtype(at::kInt)).to(device);
  return plan;
}

bool selected_blocks_win(const SelectedPlan& plan, int64_t kv_element_size, bool with_backward) {
  // Bytes per (batch x kv head x head dim) element row; K and V both travel.
  const int64_t cp = plan.layout.cp;
  int64_t selected = plan.group_selected_rows * 2 * kv_element_size;
  int64_t ring = plan.group_ring_rows * 2 * kv_element_size;
  if (with_backward) {
    selected += plan.group_selected_rows * 2 * 4;  // fp32 gradients of the fetched blocks
    // The ring again, plus cp fp32 dK/dV messages of 2c rows from every rank.
    ring += plan.group_ring_rows * 2 * kv_element_size + cp * cp * 2 * plan.layout.chunk * 2 * 4;
  }
  return selected < ring;
}

at::Tensor local_rows(const SelectedPlan& plan, const std::vector<int64_t>& blocks, const at::Device& device) {
  std::vector<int64_t> rows;
  rows.reserve(blocks.size() * static_cast<size_t>(plan.block_size));
  for (int64_t b : blocks) {
    const int64_t g = b / plan.blocks_per_chunk;
    if (plan.layout.owner(g) != plan.layout.rank) {
      throw CommError(fmt::format("{}: block {} (chunk {}) is not held by cp rank {}", process_location(), b, g,
                                  plan.layout.rank));
    }
    const int64_t first = plan.layout.slot(g) * plan.layout.chunk + (b % plan.blocks_per_chunk) * plan.block_size;
    for (int64_t i = 0; i < plan.block_size; ++i) rows.push_back(first + i);
  }
  return at::tensor(rows, at::TensorOptions().dtype(at::kLong)).to(device);
}

std::pair<at::Tensor, at::Tensor> fetch_selected(Communicator& comm, const SelectedPlan& plan, const at::Tensor& k,
                                                 const at::Tensor& v) {
  const int64_t cp = plan.layout.cp, me = plan.layout.rank;
  std::vector<P2POp> ops;
  std::vector<at::Tensor> received(static_cast<size_t>(cp));
  for (int64_t r = 0; r < cp; ++r) {
    const auto& blocks = plan.send_blocks[static_cast<size_t>(r)];
    if (r == me || blocks.empty()) continue;
    const at::Tensor rows = local_rows(plan, blocks, k.device());
    ops.push_back(P2POp::send(at::stack({k.index_select(1, rows), v.index_select(1, rows)}).contiguous(),
                              static_cast<int>(r), kTagSelectedKv));
  }
  for (int64_t o = 0; o < cp; ++o) {
    const auto& blocks = plan.recv_blocks[static_cast<size_t>(o)];
    if (o == me || blocks.empty()) continue;
    const int64_t n = static_cast<int64_t>(blocks.size()) * plan.block_size;
    received[static_cast<size_t>(o)] = at::empty({2, k.size(0), n, k.size(2), k.size(3)}, k.options());
    ops.push_back(P2POp::recv(received[static_cast<size_t>(o)], static_cast<int>(o), kTagSelectedKv));
  }
  comm.start_p2p(std::move(ops), "selected_kv").wait();
  std::vector<at::Tensor> parts;
  for (const auto& t : received) {
    if (t.defined()) parts.push_back(t);
  }
  if (parts.empty()) {
    const at::Tensor none = at::empty({k.size(0), 0, k.size(2), k.size(3)}, k.options());
    return {none, none.clone()};
  }
  const at::Tensor compact = at::cat(parts, 2);  // [2, B, n, Hkv, D]
  return {compact[0], compact[1]};
}

void return_selected_grads(Communicator& comm, const SelectedPlan& plan, const at::Tensor& dk_compact,
                           const at::Tensor& dv_compact, at::Tensor& dk, at::Tensor& dv) {
  const int64_t cp = plan.layout.cp, me = plan.layout.rank;
  std::vector<P2POp> ops;
  int64_t offset = 0;
  for (int64_t o = 0; o < cp; ++o) {
    const auto& blocks = plan.recv_blocks[static_cast<size_t>(o)];
    if (o == me || blocks.empty()) continue;
    const int64_t n = static_cast<int64_t>(blocks.size()) * plan.block_size;
    ops.push_back(P2POp::send(at::stack({dk_compact.narrow(1, offset, n), dv_compact.narrow(1, offset, n)})
                                  .to(dk.scalar_type())
                                  .contiguous(),
                              static_cast<int>(o), kTagSelectedGrad));
    offset += n;
  }
  std::vector<std::pair<int64_t, at::Tensor>> received;
  for (int64_t r = 0; r < cp; ++r) {
    const auto& blocks = plan.send_blocks[static_cast<size_t>(r)];
    if (r == me || blocks.empty()) continue;
    const int64_t n = static_cast<int64_t>(blocks.size()) * plan.block_size;
    at::Tensor buffer = at::empty({2, dk.size(0), n, dk.size(2), dk.size(3)}, dk.options());
    ops.push_back(P2POp::recv(buffer, static_cast<int>(r), kTagSelectedGrad));
    received.emplace_back(r, buffer);
  }
  comm.start_p2p(std::move(ops), "selected_dkv").wait();
  for (const auto& [r, buffer] : received) {
    const at::Tensor rows = local_rows(plan, plan.send_blocks[static_cast<size_t>(r)], dk.device());
    dk.index_add_(1, rows, buffer[0]);
    dv.index_add_(1, rows, buffer[1]);
  }
}

at::Tensor compact_block_ids(const SelectedPlan& plan, const at::Tensor& block_ids) {
  const at::Tensor ids = block_ids.to(at::kLong);
  const at::Tensor valid = ids >= 0;
  at::Tensor mapped = plan.compact_index.index_select(0, ids.clamp_min(0).reshape({-1})).view(ids.sizes());
  mapped = at::where(valid, mapped, at::full_like(mapped, -1));
  // Sort ascending with the -1 slots last (the kernels' id layout).
  const at::Tensor key = at::where(mapped < 0, at::full_like(mapped, INT_MAX), mapped);
  const at::Tensor sorted = std::get<0>(key.sort(-1));
  return at::where(sorted == INT_MAX, at::full_like(sorted, -1), sorted).to(at::kInt).contiguous();
}

}  // namespace ssa::parallel
