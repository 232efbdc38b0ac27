#include "data/document_splitter.h"

#include <zlib.h>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

namespace ssa::data {

SplitMode parse_split_mode(const std::string& name) {
  if (name == "auto") return SplitMode::kAuto;
  if (name == "file") return SplitMode::kFile;
  if (name == "blank-lines") return SplitMode::kBlankLines;
  if (name == "dict") return SplitMode::kDict;
  throw std::invalid_argument(fmt::format("split mode \"{}\" is not one of auto, file, blank-lines, dict", name));
}

std::string split_mode_name(SplitMode mode) {
  switch (mode) {
    case SplitMode::kAuto: return "auto";
    case SplitMode::kFile: return "file";
    case SplitMode::kBlankLines: return "blank-lines";
    case SplitMode::kDict: return "dict";
  }
  return "?";
}

SplitMode resolve_split_mode(SplitMode mode, const std::string& path) {
  if (mode != SplitMode::kAuto) return mode;
  auto ends_with = [&](std::string_view suffix) {
    return path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return ends_with(".dict") || ends_with(".dict.dz") ? SplitMode::kDict : SplitMode::kFile;
}

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v'; }

bool is_blank(const char* line, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (!is_space(line[i])) return false;
  }
  return true;
}

// Turns lines (each with its '\n', except possibly the file's last) into the
// documents of the blank-lines and dict modes.
class LineDocuments {
 public:
  LineDocuments(SplitMode mode, DocumentSink& sink) : mode_(mode), sink_(sink) {}

  void line(const char* p, size_t n) {
    bool blank = is_blank(p, n);
    if (mode_ == SplitMode::kBlankLines) {
      if (blank) {
        end();
      } else {
        if (!in_document_) begin();
        sink_.text(p, n);
      }
      return;
    }
    // dict: blank lines are held back until we know the entry goes on.
    if (blank) {
      if (in_document_) held_blank_.append(p, n);
      return;
    }
    bool headword = !is_space(p[0]);
    if (headword) end();
    if (!in_document_) begin();
    if (!held_blank_.empty()) {
      sink_.text(held_blank_.data(), held_blank_.size());
      held_blank_.clear();
    }
    sink_.text(p, n);
  }

  void end() {
    if (in_document_) sink_.end_document();
    in_document_ = false;
    held_blank_.clear();
  }

 private:
  void begin() {
    sink_.begin_document();
    in_document_ = true;
  }

  SplitMode mode_;
  DocumentSink& sink_;
  bool in_document_ = false;
  std::string held_blank_;
};

struct GzCloser {
  void operator()(gzFile_s* file) const { gzclose(file); }
};

}  // namespace

void split_documents(const std::string& path, SplitMode mode, DocumentSink& sink,
                     const std::function<void(int64_t)>& on_bytes) {
  mode = resolve_split_mode(mode, path);
  // gzread also passes plain (not gzip) files through unchanged.
  std::unique_ptr<gzFile_s, GzCloser> file(gzopen(path.c_str(), "rb"));
  if (!file) throw std::runtime_error(fmt::format("input {}: cannot open: {}", path, std::strerror(errno)));
  constexpr unsigned kPiece = 1u << 20;
  gzbuffer(file.get(), kPiece);
  std::vector<char> buffer(kPiece);

  LineDocuments lines(mode, sink);
  std::string carry;  // a line cut by the end of the previous piece
  if (mode == SplitMode::kFile) sink.begin_document();
  while (true) {
    int n = gzread(file.get(), buffer.data(), kPiece);
    if (n < 0) {
      int code = 0;
      const char* message = gzerror(file.get(), &code);
      throw std::runtime_error(fmt::format("input {}: read failed: {}", path, message));
    }
    if (n == 0) break;
    if (on_bytes) on_bytes(n);
    const char* p = buffer.data();
    const char* end = p + n;
    if (mode == SplitMode::kFile) {
      sink.text(p, static_cast<size_t>(n));
      continue;
    }
    while (p < end) {
      const char* newline = static_cast<const char*>(std::memchr(p, '\n', static_cast<size_t>(end - p)));
      if (newline == nullptr) {
        carry.append(p, end);
        break;
      }
      if (!carry.empty()) {
        carry.append(p, newline + 1);
        lines.line(carry.data(), carry.size());
        carry.clear();
      } else {
        lines.line(p, static_cast<size_t>(newline + 1 - p));
      }
      p = newline + 1;
    }
  }
  // gzread reports a truncated or corrupt gzip stream only through gzerror.
  int code = Z_OK;
  const char* message = gzerror(file.get(), &code);
  if (code != Z_OK && code != Z_STREAM_END) {
    throw std::runtime_error(fmt::format("input {}: decompression failed: {} (truncated or corrupt gzip file?)", path,
                                         message));
  }
  if (mode == SplitMode::kFile) {
    sink.end_document();
  } else {
    if (!carry.empty()) lines.line(carry.data(), carry.size());
    lines.end();
  }
}

}  // namespace ssa::data
