#include "data/hdf5_check.h"

namespace ssa::data {

void hdf5_silence_errors() {
  thread_local bool silenced = false;
  if (silenced) return;
  SSA_H5_CHECK(H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr), "turn off HDF5 error printing");
  silenced = true;
}

namespace {

herr_t keep_innermost(unsigned /*n*/, const H5E_error2_t* error, void* data) {
  // Walked from the API call down to where the problem was found: the last
  // entry with a description is the most specific one.
  if (error->desc != nullptr && error->desc[0] != '\0') *static_cast<std::string*>(data) = error->desc;
  return 0;
}

}  // namespace

std::string hdf5_error_detail() {
  // Already on an error path: a failure to walk or clear the stack only loses
  // the detail, so these two return codes are deliberately not acted on.
  std::string detail;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, keep_innermost, &detail);
  H5Eclear2(H5E_DEFAULT);
  return detail;
}

void hdf5_fail(const char* call, const char* file, int line, const std::string& what) {
  std::string detail = hdf5_error_detail();
  throw Hdf5Error(fmt::format("{}: {} failed ({}:{}){}", what, call, file, line,
                              detail.empty() ? std::string() : ": " + detail));
}

void H5Id::close(const std::string& what) {
  if (id_ < 0) return;
  hid_t id = std::exchange(id_, H5I_INVALID_HID);
  SSA_H5_CHECK(closer_(id), "{}", what);
}

void H5Id::reset() noexcept {
  if (id_ >= 0) closer_(id_);
  id_ = H5I_INVALID_HID;
}

}  // namespace ssa::data
