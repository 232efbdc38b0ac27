#include "core/tensor_file.h"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <fmt/format.h>

#include <stdexcept>

#include "data/hdf5_lock.h"

namespace ssa::core {
namespace {

// Every HDF5 return code is checked here: negative means failure.
#define SSA_H5_CHECK(expr, what)                                                                  \
  do {                                                                                            \
    if ((expr) < 0) throw std::runtime_error(fmt::format("{}: HDF5 failed to {} ({}:{})", path, \
                                                         what, __FILE__, __LINE__));             \
  } while (0)

// Closes an HDF5 handle when leaving scope.
struct Handle {
  hid_t id = -1;
  herr_t (*close)(hid_t) = nullptr;
  Handle(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  ~Handle() {
    if (id >= 0) close(id);
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
};

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw std::runtime_error(fmt::format("{}: cannot open to fsync", path));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw std::runtime_error(fmt::format("{}: fsync failed", path));
}

struct ListContext {
  std::vector<std::string> names;
};

herr_t collect_dataset(hid_t group, const char* name, const H5O_info_t* info, void* data) {
  if (info->type == H5O_TYPE_DATASET && std::string(name) != ".") static_cast<ListContext*>(data)->names.emplace_back(name);
  return 0;
}

}  // namespace

void write_tensor_file(const std::string& path, const std::vector<NamedTensor>& tensors) {
  {
    std::lock_guard<std::mutex> lock(data::hdf5_mutex());
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
    SSA_H5_CHECK(lcpl.id, "create a link property list");
    SSA_H5_CHECK(H5Pset_create_intermediate_group(lcpl.id, 1), "set intermediate groups");
    Handle file(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
    SSA_H5_CHECK(file.id, "create the file");
    for (const auto& entry : tensors) {
      const bool integral = !at::isFloatingType(entry.tensor.scalar_type());
      auto t = entry.tensor.detach().to(at::kCPU, integral ? at::kLong : at::kFloat).contiguous();
      std::vector<hsize_t> dims(t.sizes().begin(), t.sizes().end());
      Handle space(dims.empty() ? H5Screate(H5S_SCALAR) : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                   H5Sclose);
      SSA_H5_CHECK(space.id, "create a dataspace for " + entry.name);
      const hid_t type = integral ? H5T_NATIVE_INT64 : H5T_NATIVE_FLOAT;
      Handle dset(H5Dcreate2(file.id, entry.name.c_str(), type, space.id, lcpl.id, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
      SSA_H5_CHECK(dset.id, "create dataset " + entry.name);
      if (t.numel() > 0) SSA_H5_CHECK(H5Dwrite(dset.id, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()), "write " + entry.name);
      for (const auto& [key, value] : entry.attrs) {
        Handle aspace(H5Screate(H5S_SCALAR), H5Sclose);
        Handle attr(H5Acreate2(dset.id, key.c_str(), H5T_NATIVE_INT64, aspace.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
        SSA_H5_CHECK(attr.id, "create attribute " + key + " of " + entry.name);
        SSA_H5_CHECK(H5Awrite(attr.id, H5T_NATIVE_INT64, &value), "write attribute " + key);
      }
    }
    SSA_H5_CHECK(H5Fflush(file.id, H5F_SCOPE_GLOBAL), "flush");
  }
  fsync_path(path);
}

std::vector<NamedTensor> read_tensor_file(const std::string& path) {
  std::lock_guard<std::mutex> lock(data::hdf5_mutex());
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  if (::access(path.c_str(), R_OK) != 0) throw std::runtime_error(fmt::format("{}: checkpoint file is missing", path));
  if (H5Fis_hdf5(path.c_str()) <= 0)
    throw std::runtime_error(fmt::format("{}: not an HDF5 file (truncated or corrupt checkpoint)", path));
  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (file.id < 0) throw std::runtime_error(fmt::format("{}: cannot open (truncated or corrupt checkpoint)", path));
  ListContext names;
  SSA_H5_CHECK(H5Ovisit(file.id, H5_INDEX_NAME, H5_ITER_NATIVE, collect_dataset, &names), "list datasets");
  std::vector<NamedTensor> out;
  for (const auto& name : names.names) {
    Handle dset(H5Dopen2(file.id, name.c_str(), H5P_DEFAULT), H5Dclose);
    SSA_H5_CHECK(dset.id, "open dataset " + name);
    Handle space(H5Dget_space(dset.id), H5Sclose);
    SSA_H5_CHECK(space.id, "read the shape of " + name);
    const int rank = H5Sget_simple_extent_ndims(space.id);
    SSA_H5_CHECK(rank, "read the rank of " + name);
    std::vector<hsize_t> dims(static_cast<size_t>(rank));
    if (rank > 0) SSA_H5_CHECK(H5Sget_simple_extent_dims(space.id, dims.data(), nullptr), "read dims of " + name);
    Handle dtype(H5Dget_type(dset.id), H5Tclose);
    const bool integral = H5Tget_class(dtype.id) == H5T_INTEGER;
    std::vector<int64_t> shape(dims.begin(), dims.end());
    auto t = at::empty(shape, at::TensorOptions().dtype(integral ? at::kLong : at::kFloat));
    if (t.numel() > 0)
      SSA_H5_CHECK(H5Dread(dset.id, integral ? H5T_NATIVE_INT64 : H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT,
                           t.data_ptr()),
                   "read " + name + " (truncated or corrupt checkpoint)");
    NamedTensor entry{name, t, {}};
    const int n_attrs = H5Aget_num_attrs(dset.id);
    for (int i = 0; i < n_attrs; ++i) {
      Handle attr(H5Aopen_by_idx(dset.id, ".", H5_INDEX_NAME, H5_ITER_NATIVE, static_cast<hsize_t>(i), H5P_DEFAULT,
                                 H5P_DEFAULT),
                  H5Aclose);
      SSA_H5_CHECK(attr.id, "open an attribute of " + name);
      char key[256] = {0};
      H5Aget_name(attr.id, sizeof(key) - 1, key);
      int64_t value = 0;
      SSA_H5_CHECK(H5Aread(attr.id, H5T_NATIVE_INT64, &value), "read attribute of " + name);
      entry.attrs[key] = value;
    }
    out.push_back(std::move(entry));
  }
  return out;
}

}  // namespace ssa::core
