#include "core/tensor_file.h"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <fmt/format.h>

#include <stdexcept>

#include "data/hdf5_check.h"
#include "data/hdf5_lock.h"

namespace ssa::core {
namespace {

using data::H5Id;

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw std::runtime_error(fmt::format("{}: cannot open to fsync", path));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw std::runtime_error(fmt::format("{}: fsync failed", path));
}

herr_t collect_dataset(hid_t, const char* name, const H5O_info_t* info, void* names) {
  if (info->type == H5O_TYPE_DATASET) static_cast<std::vector<std::string>*>(names)->emplace_back(name);
  return 0;
}

// lcpl: link creation properties that create the groups of "a/b" names.
void write_one(hid_t file, hid_t lcpl, const std::string& path, const NamedTensor& entry) {
  const bool integral = !at::isFloatingType(entry.tensor.scalar_type());
  auto t = entry.tensor.detach().to(at::kCPU, integral ? at::kLong : at::kFloat).contiguous();
  std::vector<hsize_t> dims(t.sizes().begin(), t.sizes().end());
  H5Id space(SSA_H5_CHECK(dims.empty() ? H5Screate(H5S_SCALAR)
                                       : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                          "{}: dataspace of {}", path, entry.name),
             H5Sclose);
  const hid_t type = integral ? H5T_NATIVE_INT64 : H5T_NATIVE_FLOAT;
  H5Id dset(SSA_H5_CHECK(H5Dcreate2(file, entry.name.c_str(), type, space.get(), lcpl, H5P_DEFAULT, H5P_DEFAULT),
                         "{}: create dataset {}", path, entry.name),
            H5Dclose);
  if (t.numel() > 0)
    SSA_H5_CHECK(H5Dwrite(dset.get(), type, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.data_ptr()), "{}: write {}", path,
                 entry.name);
  for (const auto& [key, value] : entry.attrs) {
    H5Id aspace(SSA_H5_CHECK(H5Screate(H5S_SCALAR), "{}: attribute space", path), H5Sclose);
    H5Id attr(SSA_H5_CHECK(H5Acreate2(dset.get(), key.c_str(), H5T_NATIVE_INT64, aspace.get(), H5P_DEFAULT, H5P_DEFAULT),
                           "{}: create attribute {} of {}", path, key, entry.name),
              H5Aclose);
    SSA_H5_CHECK(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value), "{}: write attribute {} of {}", path, key, entry.name);
  }
}

NamedTensor read_one(hid_t file, const std::string& path, const std::string& name) {
  const char* corrupt = "(truncated or corrupt checkpoint)";
  H5Id dset(SSA_H5_CHECK(H5Dopen2(file, name.c_str(), H5P_DEFAULT), "{}: open dataset {} {}", path, name, corrupt),
            H5Dclose);
  H5Id space(SSA_H5_CHECK(H5Dget_space(dset.get()), "{}: shape of {}", path, name), H5Sclose);
  const int rank = SSA_H5_CHECK(H5Sget_simple_extent_ndims(space.get()), "{}: rank of {}", path, name);
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  if (rank > 0) SSA_H5_CHECK(H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr), "{}: dims of {}", path, name);
  H5Id dtype(SSA_H5_CHECK(H5Dget_type(dset.get()), "{}: type of {}", path, name), H5Tclose);
  const bool integral = H5Tget_class(dtype.get()) == H5T_INTEGER;
  auto t = at::empty(std::vector<int64_t>(dims.begin(), dims.end()), at::TensorOptions().dtype(integral ? at::kLong : at::kFloat));
  if (t.numel() > 0)
    SSA_H5_CHECK(H5Dread(dset.get(), integral ? H5T_NATIVE_INT64 : H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT,
                         t.data_ptr()),
                 "{}: read {} {}", path, name, corrupt);
  NamedTensor entry{name, t, {}};
  const int n_attrs = SSA_H5_CHECK(H5Aget_num_attrs(dset.get()), "{}: attributes of {}", path, name);
  for (int i = 0; i < n_attrs; ++i) {
    H5Id attr(SSA_H5_CHECK(H5Aopen_by_idx(dset.get(), ".", H5_INDEX_NAME, H5_ITER_NATIVE, static_cast<hsize_t>(i),
                                          H5P_DEFAULT, H5P_DEFAULT),
                           "{}: attribute {} of {}", path, i, name),
              H5Aclose);
    char key[256] = {0};
    SSA_H5_CHECK(H5Aget_name(attr.get(), sizeof(key) - 1, key), "{}: attribute name of {}", path, name);
    int64_t value = 0;
    SSA_H5_CHECK(H5Aread(attr.get(), H5T_NATIVE_INT64, &value), "{}: read attribute {} of {}", path, key, name);
    entry.attrs[key] = value;
  }
  return entry;
}

}  // namespace

void write_tensor_file(const std::string& path, const std::vector<NamedTensor>& tensors) {
  {
    std::lock_guard<std::mutex> lock(data::hdf5_mutex());
    data::hdf5_silence_errors();
    H5Id file(SSA_H5_CHECK(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), "{}: create", path),
              H5Fclose);
    H5Id lcpl(SSA_H5_CHECK(H5Pcreate(H5P_LINK_CREATE), "{}: link properties", path), H5Pclose);
    SSA_H5_CHECK(H5Pset_create_intermediate_group(lcpl.get(), 1), "{}: intermediate groups", path);
    for (const auto& entry : tensors) write_one(file.get(), lcpl.get(), path, entry);
    file.close(path);  // a failed close of a file being written must not pass unnoticed
  }
  fsync_path(path);
}

std::vector<NamedTensor> read_tensor_file(const std::string& path) {
  std::lock_guard<std::mutex> lock(data::hdf5_mutex());
  data::hdf5_silence_errors();
  if (::access(path.c_str(), R_OK) != 0) throw std::runtime_error(fmt::format("{}: checkpoint file is missing", path));
  if (H5Fis_hdf5(path.c_str()) <= 0)
    throw std::runtime_error(fmt::format("{}: not an HDF5 file (truncated or corrupt checkpoint)", path));
  H5Id file(SSA_H5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), "{}: open (truncated or corrupt checkpoint)",
                         path),
            H5Fclose);
  std::vector<std::string> names;
  SSA_H5_CHECK(H5Ovisit(file.get(), H5_INDEX_NAME, H5_ITER_NATIVE, collect_dataset, &names), "{}: list datasets", path);
  std::vector<NamedTensor> out;
  for (const auto& name : names) out.push_back(read_one(file.get(), path, name));
  return out;
}

}  // namespace ssa::core
