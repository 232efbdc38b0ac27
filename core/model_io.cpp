#include "core/model_io.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <map>
#include <stdexcept>

#include "core/tensor_file.h"

namespace ssa::core {

void save_model_weights(const Transformer& model, const std::string& path) {
  std::vector<NamedTensor> tensors;
  for (const auto& p : model.parameters()) tensors.push_back({p.name, p.tensor, {}});
  write_tensor_file(path, tensors);
}

void load_model_weights(const Transformer& model, const std::string& path) {
  std::map<std::string, at::Tensor> stored;
  for (auto& t : read_tensor_file(path)) stored[t.name] = t.tensor;
  at::NoGradGuard no_grad;
  for (const auto& p : model.parameters()) {
    auto it = stored.find(p.name);
    if (it == stored.end()) throw std::runtime_error(fmt::format("{}: parameter '{}' is missing", path, p.name));
    if (it->second.sizes() != p.tensor.sizes())
      throw std::runtime_error(fmt::format("{}: parameter '{}' has shape {} but the model needs {}", path, p.name,
                                           fmt::join(it->second.sizes(), "x"), fmt::join(p.tensor.sizes(), "x")));
    p.tensor.copy_(it->second);
  }
}

}  // namespace ssa::core
