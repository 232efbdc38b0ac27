#pragma once
// Reads a text file (plain or gzip/dictzip, decompressed on the fly with zlib's
// gzread, never unpacked to disk) and cuts it into documents.
//
// Split modes:
//   file         the whole file is one document (the default for plain text)
//   blank-lines  a run of one or more blank lines (empty or whitespace only) ends
//                a document; the blank lines themselves are dropped
//   dict         dictd dictionary format (e.g. gcide.dict.dz): a line that starts
//                with a non-blank character (a headword) starts a new entry, the
//                indented lines below it belong to it; each entry is a document,
//                with blank lines between entries dropped (blank lines inside an
//                entry are kept)
//   auto         dict for *.dict and *.dict.dz files, file for everything else
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace ssa::data {

enum class SplitMode { kAuto, kFile, kBlankLines, kDict };

// "auto" | "file" | "blank-lines" | "dict"; throws std::invalid_argument otherwise.
SplitMode parse_split_mode(const std::string& name);
std::string split_mode_name(SplitMode mode);
// kAuto resolved for this file name.
SplitMode resolve_split_mode(SplitMode mode, const std::string& path);

// Receives the documents of a file, in order. text() may be called several
// times per document (the file is read in pieces).
class DocumentSink {
 public:
  virtual ~DocumentSink() = default;
  virtual void begin_document() = 0;
  virtual void text(const char* bytes, size_t count) = 0;
  virtual void end_document() = 0;
};

// Reads `path` and feeds its documents to `sink`. `on_bytes(n)` is called with
// the number of uncompressed bytes read after each piece (for progress). Throws
// std::runtime_error naming the file on a read or decompression error.
void split_documents(const std::string& path, SplitMode mode, DocumentSink& sink,
                     const std::function<void(int64_t)>& on_bytes = {});

}  // namespace ssa::data
