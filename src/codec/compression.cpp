// Compressed cluster codecs: zlib raw deflate with a 4 KiB window and zstd, as qcow2 stores them.
#include "qcowfs/codec/compression.hpp"

#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include <algorithm>
#include <climits>
#include <memory>
#include <string>

#include "qcowfs/format/error.hpp"

namespace qcowfs::codec {

namespace {

constexpr int kZlibWindowBits = -12;  // raw deflate (no zlib header), 2^12 byte window
constexpr int kZlibMemLevel = 9;
constexpr int kZstdWindowLogMax = 22;  // 4 MiB: twice the largest cluster; bounds decoder memory

std::string sizes(size_t got, size_t want) { return std::to_string(got) + " of " + std::to_string(want) + " bytes"; }

void check_zlib_sizes(size_t in, size_t out) {
    if (in > UINT_MAX || out > UINT_MAX) fail(EINVAL, "zlib: buffer too large");
}

/// One inflate stream per thread, reset for every cluster.
struct Inflater {
    z_stream s{};
    Inflater() {
        if (inflateInit2(&s, kZlibWindowBits) != Z_OK) fail(ENOMEM, "zlib: inflateInit2 failed");
    }
    ~Inflater() { inflateEnd(&s); }
    Inflater(const Inflater&) = delete;
    Inflater& operator=(const Inflater&) = delete;
};

void zlib_decompress(std::span<const std::byte> in, std::span<std::byte> out) {
    check_zlib_sizes(in.size(), out.size());
    thread_local Inflater inflater;
    z_stream& s = inflater.s;
    if (inflateReset(&s) != Z_OK) fail(EIO, "zlib: inflateReset failed");
    s.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
    s.avail_in = static_cast<uInt>(in.size());
    s.next_out = reinterpret_cast<Bytef*>(out.data());
    s.avail_out = static_cast<uInt>(out.size());
    int rc = inflate(&s, Z_FINISH);
    // A full cluster is success even if the stream goes on: the rest is sector padding.
    if (s.avail_out == 0 && (rc == Z_STREAM_END || rc == Z_BUF_ERROR || rc == Z_OK)) return;
    size_t produced = out.size() - s.avail_out;
    if (rc == Z_MEM_ERROR) fail(ENOMEM, "zlib: out of memory");
    if (rc == Z_STREAM_END || rc == Z_BUF_ERROR || rc == Z_OK)
        corrupt("zlib: compressed cluster ends after " + sizes(produced, out.size()));
    corrupt(std::string("zlib: corrupt compressed cluster after ") + sizes(produced, out.size()) + ": " +
            (s.msg ? s.msg : "error " + std::to_string(rc)));
}

/// One zstd decompression context per thread, reset for every cluster.
struct ZstdDecoder {
    ZSTD_DCtx* ctx = ZSTD_createDCtx();
    ZstdDecoder() {
        if (!ctx) fail(ENOMEM, "zstd: cannot create a decompression context");
        ZSTD_DCtx_setParameter(ctx, ZSTD_d_windowLogMax, kZstdWindowLogMax);
    }
    ~ZstdDecoder() { ZSTD_freeDCtx(ctx); }
    ZstdDecoder(const ZstdDecoder&) = delete;
    ZstdDecoder& operator=(const ZstdDecoder&) = delete;
};

void zstd_decompress(std::span<const std::byte> in, std::span<std::byte> out) {
    thread_local ZstdDecoder decoder;
    ZSTD_DCtx_reset(decoder.ctx, ZSTD_reset_session_only);
    ZSTD_inBuffer ib{in.data(), in.size(), 0};
    ZSTD_outBuffer ob{out.data(), out.size(), 0};
    while (ob.pos < ob.size) {
        size_t in_before = ib.pos, out_before = ob.pos;
        size_t rc = ZSTD_decompressStream(decoder.ctx, &ob, &ib);
        if (ZSTD_isError(rc))
            corrupt(std::string("zstd: corrupt compressed cluster after ") + sizes(ob.pos, ob.size) + ": " +
                    ZSTD_getErrorName(rc));
        if (ib.pos == in_before && ob.pos == out_before)
            corrupt("zstd: compressed cluster ends after " + sizes(ob.pos, ob.size));
    }
}

/// The output capacity that makes compression worthwhile: smaller than the input.
size_t useful_capacity(std::span<const std::byte> in, std::span<std::byte> out) {
    return std::min(out.size(), in.size() - 1);
}

std::optional<size_t> zlib_compress(std::span<const std::byte> in, std::span<std::byte> out) {
    size_t cap = useful_capacity(in, out);
    check_zlib_sizes(in.size(), cap);
    z_stream s{};
    if (deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, kZlibWindowBits, kZlibMemLevel, Z_DEFAULT_STRATEGY) != Z_OK)
        fail(ENOMEM, "zlib: deflateInit2 failed");
    std::unique_ptr<z_stream, int (*)(z_stream*)> guard(&s, deflateEnd);
    s.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
    s.avail_in = static_cast<uInt>(in.size());
    s.next_out = reinterpret_cast<Bytef*>(out.data());
    s.avail_out = static_cast<uInt>(cap);
    int rc = deflate(&s, Z_FINISH);
    if (rc == Z_STREAM_END) return cap - s.avail_out;
    if (rc == Z_OK || rc == Z_BUF_ERROR) return std::nullopt;  // did not fit: store uncompressed
    fail(EIO, "zlib: deflate failed with error " + std::to_string(rc));
}

std::optional<size_t> zstd_compress(std::span<const std::byte> in, std::span<std::byte> out) {
    std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> ctx(ZSTD_createCCtx(), ZSTD_freeCCtx);
    if (!ctx) fail(ENOMEM, "zstd: cannot create a compression context");
    size_t rc = ZSTD_compress2(ctx.get(), out.data(), useful_capacity(in, out), in.data(), in.size());
    if (!ZSTD_isError(rc)) return rc;
    if (ZSTD_getErrorCode(rc) == ZSTD_error_dstSize_tooSmall) return std::nullopt;
    fail(EIO, std::string("zstd: compression failed: ") + ZSTD_getErrorName(rc));
}

[[noreturn]] void unknown_type(format::CompressionType type) {
    fail(ENOTSUP, "unsupported compression type " + std::to_string(static_cast<unsigned>(type)));
}

}  // namespace

void decompress_cluster(format::CompressionType type, std::span<const std::byte> in, std::span<std::byte> out) {
    switch (type) {
        case format::CompressionType::zlib: return zlib_decompress(in, out);
        case format::CompressionType::zstd: return zstd_decompress(in, out);
    }
    unknown_type(type);
}

std::optional<size_t> compress_cluster(format::CompressionType type, std::span<const std::byte> in,
                                       std::span<std::byte> out) {
    if (in.empty()) return std::nullopt;
    switch (type) {
        case format::CompressionType::zlib: return zlib_compress(in, out);
        case format::CompressionType::zstd: return zstd_compress(in, out);
    }
    unknown_type(type);
}

ClusterCompressor::ClusterCompressor(format::CompressionType type) : type_(type) {
    switch (type) {
        case format::CompressionType::zlib: {
            auto* s = new z_stream{};
            if (deflateInit2(s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, kZlibWindowBits, kZlibMemLevel, Z_DEFAULT_STRATEGY) !=
                Z_OK) {
                delete s;
                fail(ENOMEM, "zlib: deflateInit2 failed");
            }
            ctx_ = s;
            return;
        }
        case format::CompressionType::zstd:
            ctx_ = ZSTD_createCCtx();
            if (!ctx_) fail(ENOMEM, "zstd: cannot create a compression context");
            return;
    }
    unknown_type(type);
}

ClusterCompressor::~ClusterCompressor() {
    if (type_ == format::CompressionType::zlib) {
        auto* s = static_cast<z_stream*>(ctx_);
        deflateEnd(s);
        delete s;
    } else {
        ZSTD_freeCCtx(static_cast<ZSTD_CCtx*>(ctx_));
    }
}

std::optional<size_t> ClusterCompressor::compress(std::span<const std::byte> in, std::span<std::byte> out) {
    if (in.empty()) return std::nullopt;
    size_t cap = useful_capacity(in, out);
    if (type_ == format::CompressionType::zstd) {
        auto* ctx = static_cast<ZSTD_CCtx*>(ctx_);
        ZSTD_CCtx_reset(ctx, ZSTD_reset_session_only);
        size_t rc = ZSTD_compress2(ctx, out.data(), cap, in.data(), in.size());
        if (!ZSTD_isError(rc)) return rc;
        if (ZSTD_getErrorCode(rc) == ZSTD_error_dstSize_tooSmall) return std::nullopt;
        fail(EIO, std::string("zstd: compression failed: ") + ZSTD_getErrorName(rc));
    }
    check_zlib_sizes(in.size(), cap);
    auto* s = static_cast<z_stream*>(ctx_);
    if (deflateReset(s) != Z_OK) fail(EIO, "zlib: deflateReset failed");
    s->next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
    s->avail_in = static_cast<uInt>(in.size());
    s->next_out = reinterpret_cast<Bytef*>(out.data());
    s->avail_out = static_cast<uInt>(cap);
    int rc = deflate(s, Z_FINISH);
    if (rc == Z_STREAM_END) return cap - s->avail_out;
    if (rc == Z_OK || rc == Z_BUF_ERROR) return std::nullopt;
    fail(EIO, "zlib: deflate failed with error " + std::to_string(rc));
}

}  // namespace qcowfs::codec
