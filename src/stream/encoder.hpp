// encode: a raw disk written out as a qcow2 v3 stream, metadata first, data in guest order.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "qcowfs/format/header.hpp"

namespace qcowfs::stream {

struct EncodeOptions {
    bool progress = false;
    std::optional<format::CompressionType> compression;  // nullopt: no compressed clusters
    uint32_t cluster_bits = 16;
    std::string spill_dir;  // temporary files ("" = $TMPDIR or /tmp)
    unsigned threads = 0;   // compression workers (0 = number of CPUs)
};

struct EncodeStats {
    uint64_t virtual_size = 0;
    uint64_t data_clusters = 0;        // guest clusters stored (not all-zero)
    uint64_t compressed_clusters = 0;  // of which compressed
    uint64_t image_bytes = 0;          // bytes written to OUT
    bool spooled_input = false;        // IN was not seekable and was copied to a temporary file
};

/// Reads the raw disk on `in_fd` and writes a qcow2 image to `out_fd` strictly front to back:
/// header, refcount table, refcount blocks, L1 table, L2 tables, then the data clusters in guest
/// order. All-zero clusters stay unallocated. IN that cannot seek (a pipe) is first copied into
/// an anonymous temporary file (zero blocks become holes); a regular file or device is read in
/// two passes — find the non-zero clusters (and compress them into a temporary file with -c),
/// then write. Throws std::system_error on I/O errors; OUT is then incomplete.
EncodeStats encode(int in_fd, int out_fd, const EncodeOptions& options);

}  // namespace qcowfs::stream
