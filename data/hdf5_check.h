#pragma once
// Checked HDF5 calls and owned HDF5 ids.
//
// Every HDF5 call goes through SSA_H5_CHECK: a negative return (herr_t, hid_t,
// htri_t, ssize_t all signal failure that way) throws Hdf5Error whose message
// names the object being worked on, the call, the source line and HDF5's own
// innermost error description. HDF5's automatic error-stack printing is turned
// off (per thread: thread-safe builds keep one error stack per thread), so a bad
// file gives one clear line instead of a screenful of HDF5 internals.
#include <hdf5.h>

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "data/hdf5_lock.h"

namespace ssa::data {

class Hdf5Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Turns off HDF5's error printing on the calling thread. Cheap after the first
// call per thread; every entry point into HDF5 in this library calls it.
void hdf5_silence_errors();

// The innermost description on the calling thread's HDF5 error stack, e.g.
// "file signature not found"; empty when the stack is empty.
std::string hdf5_error_detail();

[[noreturn]] void hdf5_fail(const char* call, const char* file, int line, const std::string& what);

template <class T, class What>
T hdf5_checked(T value, const char* call, const char* file, int line, What&& what) {
  if (value < 0) hdf5_fail(call, file, line, what());
  return value;
}

// SSA_H5_CHECK(H5Fopen(path, ...), "open shard {}", path): the call's value, or
// Hdf5Error "open shard PATH: H5Fopen(...) failed (data/x.cpp:12): HDF5 detail".
// The message arguments are evaluated only on failure.
#define SSA_H5_CHECK(call, ...)                                                         \
  ::ssa::data::hdf5_checked((call), #call, __FILE__, __LINE__,                           \
                            [&]() -> std::string { return fmt::format(__VA_ARGS__); })

// An owned HDF5 id, closed with the function that matches its kind.
class H5Id {
 public:
  using Closer = herr_t (*)(hid_t);
  H5Id() = default;
  H5Id(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~H5Id() { reset(); }
  H5Id(H5Id&& other) noexcept : id_(std::exchange(other.id_, H5I_INVALID_HID)), closer_(other.closer_) {}
  H5Id& operator=(H5Id&& other) noexcept {
    if (this != &other) {
      reset();
      id_ = std::exchange(other.id_, H5I_INVALID_HID);
      closer_ = other.closer_;
    }
    return *this;
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;

  hid_t get() const { return id_; }
  explicit operator bool() const { return id_ >= 0; }
  // Closes now and reports a failure (closing a file flushes it, so a failed
  // close of a file being written must not go unnoticed).
  void close(const std::string& what);
  void reset() noexcept;

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// Shorthands that check the call and wrap the id with its closer.
#define SSA_H5_FILE(call, ...) ::ssa::data::H5Id(SSA_H5_CHECK(call, __VA_ARGS__), H5Fclose)
#define SSA_H5_DATASET(call, ...) ::ssa::data::H5Id(SSA_H5_CHECK(call, __VA_ARGS__), H5Dclose)
#define SSA_H5_SPACE(call, ...) ::ssa::data::H5Id(SSA_H5_CHECK(call, __VA_ARGS__), H5Sclose)
#define SSA_H5_TYPE(call, ...) ::ssa::data::H5Id(SSA_H5_CHECK(call, __VA_ARGS__), H5Tclose)
#define SSA_H5_ATTR(call, ...) ::ssa::data::H5Id(SSA_H5_CHECK(call, __VA_ARGS__), H5Aclose)
#define SSA_H5_PLIST(call, ...) ::ssa::data::H5Id(SSA_H5_CHECK(call, __VA_ARGS__), H5Pclose)

}  // namespace ssa::data
