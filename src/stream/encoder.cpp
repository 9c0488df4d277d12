// The stream encoder: scan (and compress) first, lay the image out, then write it front to back.
//
// Metadata precedes data in the output, and the metadata's size and contents depend on which
// clusters hold data (and, with -c, on every compressed size), so the input is scanned first:
//   pass 1  read IN (skipping holes via SEEK_DATA/SEEK_HOLE), note each non-zero cluster; with -c
//           compress them on all cores and append the results, in guest order, to a spool file;
//   layout  count the L2 tables and data clusters, size the refcount structures to cover every
//           cluster of the image including themselves;
//   pass 2  write header, refcount table, refcount blocks, L1, L2 tables, then the data (read
//           again from IN, or copied from the spool).
#include "stream/encoder.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "qcowfs/codec/compression.hpp"
#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "stream/ordered_pool.hpp"
#include "stream/progress.hpp"
#include "stream/raw_sink.hpp"
#include "stream/sysio.hpp"

namespace qcowfs::stream {

namespace {

constexpr size_t kChunk = 4u << 20;
constexpr uint32_t kRefcountOrder = 4;  // 16-bit refcounts, QEMU's default
constexpr size_t kSpoolBlock = 64u << 10;

/// One stored guest cluster: where its bytes go, relative to the start of the data area.
struct Placed {
    uint64_t guest_cluster;
    uint64_t offset;  // in the data area (the spool file with -c; cluster index * cs without)
    uint32_t length;  // bytes (compressed size, or the cluster size)
    bool compressed;
};

/// Calls fn(start, end) for each range of [0, size) that may hold data (cluster aligned); the
/// whole range when the descriptor does not report holes.
template <class Fn>
void for_each_data_range(int fd, uint64_t size, uint64_t cs, Fn fn) {
    uint64_t at = 0;
    while (at < size) {
        off_t d = ::lseek(fd, static_cast<off_t>(at), SEEK_DATA);
        if (d < 0) {
            if (errno == ENXIO) return;  // only a hole is left
            fn(at, size);                // no hole information (device, FUSE file without lseek)
            return;
        }
        off_t h = ::lseek(fd, d, SEEK_HOLE);
        uint64_t end = h < 0 ? size : std::min<uint64_t>(size, static_cast<uint64_t>(h));
        uint64_t start = static_cast<uint64_t>(d) & ~(cs - 1);
        end = std::min(size, (end + cs - 1) & ~(cs - 1));
        if (end <= at) end = std::min(size, at + cs);
        fn(std::max(start, at), end);
        at = end;
    }
}

/// Copies a non-seekable input into an anonymous temporary file, leaving zero blocks as holes.
/// Returns the descriptor and sets `size` to the number of bytes read.
int spool_input(int in, const std::string& dir, uint64_t& size, Progress& progress) {
    int fd = open_temp_file(dir, "input");
    std::vector<std::byte> buf(kChunk);
    size = 0;
    for (;;) {
        size_t n = read_full(in, buf, "the input");
        for (size_t at = 0; at < n; at += kSpoolBlock) {
            auto part = std::span(buf).subspan(at, std::min(kSpoolBlock, n - at));
            if (!all_zero(part)) pwrite_all(fd, part, size + at, "the input spool file");
        }
        size += n;
        progress.update(size, "copying the input to a temporary file");
        if (n < buf.size()) break;
    }
    if (::ftruncate(fd, static_cast<off_t>(size)) != 0) fail(errno, "cannot size the input spool file");
    return fd;
}

/// A chunk of guest clusters compressed on a worker. Results: per cluster, nothing (all zero),
/// compressed bytes, or the raw cluster (did not compress).
struct CompressBatch : Batch {
    format::CompressionType type;
    uint64_t cs;
    uint64_t first_cluster;
    std::vector<std::byte> in;       // whole clusters (last one zero padded)
    std::vector<std::byte> out;      // compressed bytes, back to back
    struct Result {
        enum Kind { zero, compressed, raw } kind = zero;
        size_t offset = 0, length = 0;  // in `out` (compressed) or `in` (raw)
    };
    std::vector<Result> results;

    void run() override {
        size_t n = in.size() / cs;
        results.assign(n, {});
        out.resize(in.size());
        size_t used = 0;
        std::vector<std::byte> tmp(cs);
        for (size_t i = 0; i < n; ++i) {
            std::span<const std::byte> cl(in.data() + i * cs, cs);
            if (all_zero(cl)) continue;
            auto len = codec::compress_cluster(type, cl, tmp);
            if (len) {
                std::memcpy(out.data() + used, tmp.data(), *len);
                results[i] = {Result::compressed, used, *len};
                used += *len;
            } else {
                results[i] = {Result::raw, i * cs, cs};
            }
        }
    }
};

class Encoder {
public:
    Encoder(int in, int out, const EncodeOptions& o) : in_(in), out_(out), o_(o), progress_(o.progress, "encode") {}
    ~Encoder() {
        if (spooled_in_ >= 0) ::close(spooled_in_);
        if (spool_ >= 0) ::close(spool_);
    }
    EncodeStats run();

private:
    void scan_uncompressed();
    void scan_compressed();
    void on_compressed(Batch& b);
    void write_image();

    int in_, out_;
    EncodeOptions o_;
    Progress progress_;
    int spooled_in_ = -1;  // the input copied to a temporary file, when IN is a pipe
    int src_ = -1;         // what passes read: in_ or spooled_in_
    uint64_t in_size_ = 0;
    uint64_t vsize_ = 0;
    uint64_t cs_ = 0;
    ClusterGeometry g_;
    std::vector<Placed> placed_;  // guest order
    int spool_ = -1;              // compressed data area (with -c)
    std::unique_ptr<RawSink> spool_sink_;
    uint64_t spool_len_ = 0;
    uint64_t scanned_ = 0;
    EncodeStats stats_;
};

void Encoder::scan_uncompressed() {
    std::vector<std::byte> buf(kChunk);
    for_each_data_range(src_, in_size_, cs_, [&](uint64_t start, uint64_t end) {
        for (uint64_t at = start; at < end; at += kChunk) {
            size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, end - at));
            pread_all(src_, std::span(buf).first(n), at, "the input");
            for (size_t off = 0; off < n; off += cs_) {
                auto cl = std::span(buf).subspan(off, std::min<size_t>(cs_, n - off));
                if (all_zero(cl)) continue;
                uint64_t c = (at + off) / cs_;
                placed_.push_back({c, placed_.size() * cs_, static_cast<uint32_t>(cs_), false});
            }
            scanned_ = at + n;
            progress_.update(scanned_, "scanning");
        }
    });
}

void Encoder::on_compressed(Batch& b) {
    auto& cb = static_cast<CompressBatch&>(b);
    for (size_t i = 0; i < cb.results.size(); ++i) {
        const auto& r = cb.results[i];
        if (r.kind == CompressBatch::Result::zero) continue;
        uint64_t c = cb.first_cluster + i;
        if (r.kind == CompressBatch::Result::compressed) {
            placed_.push_back({c, spool_len_, static_cast<uint32_t>(r.length), true});
            spool_sink_->write_at(spool_len_, std::span(cb.out).subspan(r.offset, r.length));
            spool_len_ += r.length;
            ++stats_.compressed_clusters;
        } else {
            // An uncompressed cluster in the data area must start on a cluster boundary.
            uint64_t aligned = (spool_len_ + cs_ - 1) & ~(cs_ - 1);
            if (aligned > spool_len_) spool_sink_->write_zeros(spool_len_, aligned - spool_len_);
            spool_len_ = aligned;
            placed_.push_back({c, spool_len_, static_cast<uint32_t>(cs_), false});
            spool_sink_->write_at(spool_len_, std::span(cb.in).subspan(r.offset, cs_));
            spool_len_ += cs_;
        }
    }
    scanned_ = std::max(scanned_, (cb.first_cluster * cs_) + cb.in.size());
    progress_.update(std::min(scanned_, vsize_), "compressing");
}

void Encoder::scan_compressed() {
    spool_ = open_temp_file(o_.spill_dir.empty() ? default_temp_dir() : o_.spill_dir, "data");
    spool_sink_ = std::make_unique<RawSink>(spool_, false);
    unsigned threads = o_.threads ? o_.threads : default_threads();
    OrderedPool pool(threads, threads * 2);
    auto done = [this](Batch& b) { on_compressed(b); };
    for_each_data_range(src_, in_size_, cs_, [&](uint64_t start, uint64_t end) {
        for (uint64_t at = start; at < end; at += kChunk) {
            size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, end - at));
            auto b = std::make_unique<CompressBatch>();
            b->type = *o_.compression;
            b->cs = cs_;
            b->first_cluster = at / cs_;
            b->in.assign((n + cs_ - 1) / cs_ * cs_, std::byte{0});
            pread_all(src_, std::span(b->in).first(n), at, "the input");
            pool.submit(std::move(b), done);
            pool.poll(done);
        }
    });
    pool.drain(done);
    spool_sink_->flush();
}

EncodeStats Encoder::run() {
    cs_ = uint64_t{1} << o_.cluster_bits;
    g_ = ClusterGeometry{o_.cluster_bits, false};
    std::string dir = o_.spill_dir.empty() ? default_temp_dir() : o_.spill_dir;
    FdKind kind = fd_kind(in_);
    if (kind == FdKind::other) {
        spooled_in_ = spool_input(in_, dir, in_size_, progress_);
        src_ = spooled_in_;
        stats_.spooled_input = true;
    } else {
        src_ = in_;
        in_size_ = fd_size(in_);
        ::posix_fadvise(in_, 0, 0, POSIX_FADV_SEQUENTIAL);
    }
    vsize_ = (in_size_ + 511) & ~uint64_t{511};  // qcow2 sizes are whole sectors
    stats_.virtual_size = vsize_;
    progress_.set_total(vsize_);
    if (o_.compression)
        scan_compressed();
    else
        scan_uncompressed();
    progress_.finish(vsize_, o_.compression ? "compressed" : "scanned");
    write_image();
    return stats_;
}

void Encoder::write_image() {
    const uint64_t l2e = g_.l2_entries();
    const uint64_t l1_entries = g_.l1_entries_for(vsize_);
    if (l1_entries * 8 > format::kMaxL1Bytes)
        fail(EFBIG, "the disk is too large for cluster size " + std::to_string(cs_) + " (L1 table over 32 MiB)");
    const uint64_t l1_clusters = (l1_entries * 8 + cs_ - 1) / cs_;

    // L2 tables: one per L1 index holding a stored cluster, in guest order.
    std::vector<uint64_t> l2_index_of_l1(l1_entries, UINT64_MAX);
    uint64_t l2_count = 0;
    for (const auto& p : placed_)
        if (l2_index_of_l1[p.guest_cluster / l2e] == UINT64_MAX) l2_index_of_l1[p.guest_cluster / l2e] = l2_count++;

    const uint64_t data_bytes = o_.compression ? spool_len_ : placed_.size() * cs_;
    const uint64_t data_clusters = (data_bytes + cs_ - 1) / cs_;

    // Refcount structures cover every cluster of the image, themselves included.
    const uint64_t per_block = format::refcount_block_entries(o_.cluster_bits, kRefcountOrder);
    uint64_t rt_clusters = 1, blocks = 1;
    for (;;) {
        uint64_t total = 1 + rt_clusters + blocks + l1_clusters + l2_count + data_clusters;
        uint64_t nb = (total + per_block - 1) / per_block;
        uint64_t nrt = std::max<uint64_t>(1, (nb * 8 + cs_ - 1) / cs_);
        if (nb == blocks && nrt == rt_clusters) break;
        blocks = nb;
        rt_clusters = nrt;
    }
    if ((rt_clusters << o_.cluster_bits) > format::kMaxRefcountTableBytes)
        fail(EFBIG, "the image is too large for cluster size " + std::to_string(cs_) + " (refcount table over 8 MiB)");
    const uint64_t rt_offset = cs_;
    const uint64_t rb_offset = rt_offset + rt_clusters * cs_;
    const uint64_t l1_offset = rb_offset + blocks * cs_;
    const uint64_t l2_offset = l1_offset + l1_clusters * cs_;
    const uint64_t data_offset = l2_offset + l2_count * cs_;
    const uint64_t total_clusters = data_offset / cs_ + data_clusters;

    // Refcounts: 1 for every metadata cluster and every uncompressed data cluster; a host cluster
    // holding compressed data counts each compressed cluster whose descriptor range touches it.
    std::vector<uint16_t> data_refs(data_clusters, 0);
    std::vector<std::byte> l2(l2_count * cs_);
    for (const auto& p : placed_) {
        uint64_t host = data_offset + p.offset;
        uint64_t raw;
        if (p.compressed) {
            raw = format::encode_l2_compressed(host, p.length, o_.cluster_bits);
            auto e = format::decode_l2(raw, 0, g_, 3);
            uint64_t first = (e.host_offset - data_offset) / cs_;
            uint64_t last = (e.host_offset + e.compressed_size - 1 - data_offset) / cs_;
            for (uint64_t i = first; i <= last && i < data_clusters; ++i) ++data_refs[i];
        } else {
            raw = format::encode_l2_standard(host, true, false);
            data_refs[p.offset / cs_] = 1;
        }
        uint64_t table = l2_index_of_l1[p.guest_cluster / l2e];
        format::store_be64(l2.data() + table * cs_ + (p.guest_cluster % l2e) * 8, raw);
    }
    for (uint16_t r : data_refs)
        if (r == 0 || r > format::max_refcount(kRefcountOrder))
            fail(EIO, "internal error: a data cluster without references or with too many");

    std::vector<std::byte> cluster0;
    {
        format::ImageMetadata m;
        format::Header& h = m.header;
        h.version = 3;
        h.cluster_bits = o_.cluster_bits;
        h.size = vsize_;
        h.l1_size = static_cast<uint32_t>(l1_entries);
        h.l1_table_offset = l1_offset;
        h.refcount_table_offset = rt_offset;
        h.refcount_table_clusters = static_cast<uint32_t>(rt_clusters);
        h.refcount_order = kRefcountOrder;
        h.header_length = format::kV3MinHeaderLength;
        h.compression_type = o_.compression.value_or(format::CompressionType::zlib);
        if (h.compression_type != format::CompressionType::zlib)
            h.incompatible_features |= format::kIncompatCompressionType;
        cluster0 = format::serialize_metadata(m);
        cluster0.resize(cs_);
    }

    RawSink out(out_, false);
    uint64_t at = 0;
    auto put = [&](std::span<const std::byte> d) {
        out.write_at(at, d);
        at += d.size();
    };
    put(cluster0);
    {
        std::vector<std::byte> rt(rt_clusters * cs_);
        for (uint64_t b = 0; b < blocks; ++b) format::store_be64(rt.data() + b * 8, rb_offset + b * cs_);
        put(rt);
    }
    {
        std::vector<std::byte> block(cs_);
        for (uint64_t b = 0; b < blocks; ++b) {
            std::fill(block.begin(), block.end(), std::byte{0});
            for (uint64_t i = 0; i < per_block; ++i) {
                uint64_t cl = b * per_block + i;
                if (cl >= total_clusters) break;
                uint64_t dc = data_offset / cs_;
                format::set_refcount(block, kRefcountOrder, i, cl < dc ? 1 : data_refs[cl - dc]);
            }
            put(block);
        }
    }
    {
        std::vector<std::byte> l1(l1_clusters * cs_);
        for (uint64_t i = 0; i < l1_entries; ++i)
            if (l2_index_of_l1[i] != UINT64_MAX)
                format::store_be64(l1.data() + i * 8,
                                   format::encode_l1({l2_offset + l2_index_of_l1[i] * cs_, true}));
        put(l1);
    }
    put(l2);
    l2 = {};

    Progress wp(o_.progress, "encode: writing");
    wp.set_total(data_clusters * cs_);
    std::vector<std::byte> buf(kChunk);
    if (o_.compression) {
        for (uint64_t done = 0; done < spool_len_;) {
            size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, spool_len_ - done));
            pread_all(spool_, std::span(buf).first(n), done, "the data spool file");
            put(std::span(buf).first(n));
            done += n;
            wp.update(done);
        }
    } else {
        // Runs of consecutive guest clusters are read in one pread.
        size_t i = 0;
        while (i < placed_.size()) {
            size_t j = i + 1;
            while (j < placed_.size() && placed_[j].guest_cluster == placed_[j - 1].guest_cluster + 1 &&
                   (j - i) * cs_ < kChunk)
                ++j;
            uint64_t from = placed_[i].guest_cluster * cs_;
            size_t n = (j - i) * cs_;
            size_t have = static_cast<size_t>(std::min<uint64_t>(n, in_size_ - from));
            pread_all(src_, std::span(buf).first(have), from, "the input");
            std::memset(buf.data() + have, 0, n - have);
            put(std::span(buf).first(n));
            i = j;
            wp.update(at - data_offset);
        }
    }
    // The last host cluster is written whole, so that every cluster the refcounts count exists.
    uint64_t end = data_offset + data_clusters * cs_;
    if (end > at) out.write_zeros(at, end - at), at = end;
    out.flush();
    wp.finish(at - data_offset);
    stats_.data_clusters = placed_.size();
    stats_.image_bytes = at;
}

}  // namespace

EncodeStats encode(int in_fd, int out_fd, const EncodeOptions& options) {
    Encoder e(in_fd, out_fd, options);
    return e.run();
}

}  // namespace qcowfs::stream
