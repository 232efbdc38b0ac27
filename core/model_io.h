#pragma once
// Model weights <-> HDF5 file (fp32 datasets named as Transformer::parameters()).
#include <string>

#include "core/model.h"

namespace ssa::core {

void save_model_weights(const Transformer& model, const std::string& path);
// Every parameter must be present with its shape; throws naming the file and
// the parameter otherwise.
void load_model_weights(const Transformer& model, const std::string& path);

}  // namespace ssa::core
