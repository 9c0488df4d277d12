// decode: a qcow2 image read once, front to back, from a pipe or file, written out as the raw disk.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace qcowfs::stream {

struct DecodeOptions {
    bool progress = false;
    /// Skip unallocated and zero ranges instead of writing zeros. Default: on for regular files,
    /// off for block devices; never for a pipe.
    std::optional<bool> sparse;
    uint64_t memory = uint64_t{256} << 20;  // bytes of retained clusters kept in memory
    std::string spill_dir;                  // where the spill file goes ("" = $TMPDIR or /tmp)
    std::string backing;                    // raw or qcow2 backing file ("" = none given)
    unsigned threads = 0;                   // decompression workers (0 = number of CPUs)
    bool verbose = false;                   // print what was retained and spilled at the end
};

/// What a decode did, for -v and the tests.
struct DecodeStats {
    uint64_t stream_bytes = 0;    // bytes read from IN
    uint64_t virtual_size = 0;
    uint64_t peak_memory = 0;     // most retained bytes in memory at one time
    uint64_t peak_spill = 0;      // largest spill file
    uint64_t compressed_clusters = 0;
};

/// Decodes the qcow2 image read from `in_fd` (read sequentially to its end, never seeked) into
/// the raw disk on `out_fd`. `out_positioned`: out_fd is a regular file or block device that may be
/// written at guest offsets (a regular file must be empty: it is extended to the virtual size).
/// Throws std::system_error with a message naming the offset on a bad stream (EIO), an
/// unsupported image (ENOTSUP) or an I/O error (its errno). On error the output is incomplete.
DecodeStats decode(int in_fd, int out_fd, bool out_positioned, const DecodeOptions& options);

}  // namespace qcowfs::stream
