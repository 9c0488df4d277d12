// Compressed cluster codecs: zlib (raw deflate, window 2^12) and zstd, as qcow2 stores them.
#pragma once

#include <cstddef>
#include <optional>
#include <span>

#include "qcowfs/format/header.hpp"

namespace qcowfs::codec {

/// Decompresses one compressed cluster. `in` is what the compressed descriptor covers (it may carry
/// trailing bytes of sector padding, which are ignored); `out` is exactly one cluster and must be
/// filled completely. Throws std::system_error(EIO) if the data is corrupt or too short.
void decompress_cluster(format::CompressionType type, std::span<const std::byte> in, std::span<std::byte> out);

/// Compresses one cluster into `out` (which must be at least in.size() bytes). Returns the
/// compressed length, or nullopt if the result would not be smaller than the input.
std::optional<size_t> compress_cluster(format::CompressionType type, std::span<const std::byte> in,
                                       std::span<std::byte> out);

/// Compresses clusters one after another with one reused zlib or zstd context: the same output as
/// compress_cluster, without building a context (and clearing its tables) for every cluster.
/// One object per thread; not thread-safe.
class ClusterCompressor {
public:
    explicit ClusterCompressor(format::CompressionType type);
    ~ClusterCompressor();
    ClusterCompressor(const ClusterCompressor&) = delete;
    ClusterCompressor& operator=(const ClusterCompressor&) = delete;

    /// As compress_cluster: the compressed length, or nullopt if it would not be smaller.
    std::optional<size_t> compress(std::span<const std::byte> in, std::span<std::byte> out);

private:
    format::CompressionType type_;
    void* ctx_ = nullptr;  // ZSTD_CCtx* or z_stream*
};

}  // namespace qcowfs::codec
