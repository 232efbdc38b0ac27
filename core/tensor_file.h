#pragma once
// HDF5 files of named tensors (checkpoint weights and optimizer shards): each
// tensor a dataset at its name ("layers.0.wq"), stored as fp32 (or int64) with
// its shape; integer attributes per dataset (e.g. a shard's global offset).
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace ssa::core {

struct NamedTensor {
  std::string name;
  at::Tensor tensor;                      // any device/dtype; written as fp32 (float types) or int64
  std::map<std::string, int64_t> attrs;   // stored as dataset attributes
};

// Writes all tensors to `path` (created or truncated) and fsyncs the file.
void write_tensor_file(const std::string& path, const std::vector<NamedTensor>& tensors);

// Reads every dataset of the file (CPU tensors, fp32 or int64). Throws
// std::runtime_error naming the file on a missing, truncated or corrupt file.
std::vector<NamedTensor> read_tensor_file(const std::string& path);

}  // namespace ssa::core
