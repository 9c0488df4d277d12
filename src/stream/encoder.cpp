// The stream encoder: scan (and compress) first, lay the image out, then write it front to back.
//
// Metadata precedes data in the image, and the metadata's size and contents depend on which
// clusters hold data (and, with -c, on every compressed size), so the input is scanned first:
//   pass 1  read IN (skipping holes via SEEK_DATA/SEEK_HOLE), note each non-zero cluster; with -c
//           compress them on all cores, results placed in guest order;
//   layout  count the L2 tables and data clusters, size the refcount structures to cover every
//           cluster of the image including themselves;
//   pass 2  write header, refcount table, refcount blocks, L1, L2 tables.
// Where the data goes in pass 1 depends on OUT:
//   - a regular file: straight to its final place. The data area starts after room for the
//     largest metadata the input could need (every cluster in a data range non-zero, and with -c
//     every other cluster padded); unused room stays a hole that nothing references. The metadata
//     is then written in front of it. IN is read once.
//   - a pipe or device: with -c into an anonymous spool file, copied to OUT after the metadata;
//     without -c nowhere: pass 2 reads the non-zero clusters from IN again.
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
    size_t in_size = 0;                 // bytes of `in` (whole clusters, the last one zero padded)
    std::unique_ptr<std::byte[]> in;
    std::unique_ptr<std::byte[]> out;  // compressed bytes, back to back
    struct Result {
        enum Kind { zero, compressed, raw } kind = zero;
        size_t offset = 0, length = 0;  // in `out` (compressed) or `in` (raw)
    };
    std::vector<Result> results;

    void run() override {
        // One compressor per worker thread and type, reused for every cluster.
        thread_local std::unique_ptr<codec::ClusterCompressor> compressors[2];
        auto& comp = compressors[static_cast<int>(type)];
        if (!comp) comp = std::make_unique<codec::ClusterCompressor>(type);
        size_t n = in_size / cs;
        results.assign(n, {});
        out = std::make_unique_for_overwrite<std::byte[]>(in_size);
        size_t used = 0;
        for (size_t i = 0; i < n; ++i) {
            std::span<const std::byte> cl(in.get() + i * cs, cs);
            if (all_zero(cl)) continue;
            // Compressed output shorter than the cluster fits in what is left of `out`: every
            // earlier cluster used at most its own cluster's share.
            auto len = comp->compress(cl, std::span(out.get() + used, cs));
            if (len) {
                results[i] = {Result::compressed, used, *len};
                used += *len;
            } else {
                results[i] = {Result::raw, i * cs, cs};
            }
        }
    }
};

/// Where the image's parts go, in clusters from the start of the file.
struct Layout {
    uint64_t rt_clusters = 1, blocks = 1, l1_clusters = 0, l2_slots = 0;
    uint64_t rt_offset = 0, rb_offset = 0, l1_offset = 0, l2_offset = 0, data_offset = 0;
};

/// Sizes the refcount table and blocks for an image with `l2_slots` L2 tables and up to
/// `data_clusters` data clusters, and places everything after the header cluster.
Layout plan_layout(uint64_t cs, uint32_t cluster_bits, uint64_t l1_clusters, uint64_t l2_slots, uint64_t data_clusters) {
    Layout l;
    l.l1_clusters = l1_clusters;
    l.l2_slots = l2_slots;
    const uint64_t per_block = format::refcount_block_entries(cluster_bits, kRefcountOrder);
    for (;;) {
        uint64_t total = 1 + l.rt_clusters + l.blocks + l1_clusters + l2_slots + data_clusters;
        uint64_t nb = (total + per_block - 1) / per_block;
        uint64_t nrt = std::max<uint64_t>(1, (nb * 8 + cs - 1) / cs);
        if (nb <= l.blocks && nrt <= l.rt_clusters) break;
        l.blocks = std::max(l.blocks, nb);
        l.rt_clusters = std::max(l.rt_clusters, nrt);
    }
    if ((l.rt_clusters << cluster_bits) > format::kMaxRefcountTableBytes)
        fail(EFBIG, "the image is too large for cluster size " + std::to_string(cs) + " (refcount table over 8 MiB)");
    l.rt_offset = cs;
    l.rb_offset = l.rt_offset + l.rt_clusters * cs;
    l.l1_offset = l.rb_offset + l.blocks * cs;
    l.l2_offset = l.l1_offset + l1_clusters * cs;
    l.data_offset = l.l2_offset + l2_slots * cs;
    return l;
}

/// What write_image works out before writing: where every table goes and what it holds.
struct MetadataPlan {
    Layout l;
    uint64_t cs = 0;
    uint64_t l1_entries = 0, l1_clusters = 0;
    std::vector<uint64_t> l2_index_of_l1;  // UINT64_MAX: no L2 table for that L1 index
    uint64_t l2_count = 0;
    uint64_t data_clusters = 0;            // host clusters of the data area
    uint64_t dc = 0;                       // host cluster index where the data area starts
    uint64_t total_clusters = 0;           // host clusters the refcount blocks count
    uint64_t per_block = 0;                // refcount entries per refcount block
    std::vector<std::byte> l2;             // the L2 tables, back to back
    std::vector<uint16_t> data_refs;       // refcount of each data area cluster
    uint64_t refcount(uint64_t host_cluster) const;
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
    /// Writes the image after the scan: metadata, then (unless OUT is a regular file, which has
    /// its data already) the data area. Throws std::system_error on a write error.
    void write_image();
    /// Places the L2 tables and sizes everything (EIO "internal error" if the plan made before
    /// pass 1 is too small).
    MetadataPlan plan_metadata() const;
    /// Fills the L2 tables and the data area's refcounts from placed_.
    void fill_l2_and_refcounts(MetadataPlan& m) const;
    std::vector<std::byte> header_cluster(const MetadataPlan& m) const;
    /// Writes header, refcount table and blocks, L1 and L2 tables from offset 0; returns the end.
    uint64_t write_metadata(RawSink& out, const MetadataPlan& m) const;
    /// The data area from the spool file (-c to a pipe) or from the input, written at `at`.
    void copy_spooled_data(RawSink& out, uint64_t& at, Progress& wp) const;
    void copy_input_clusters(RawSink& out, uint64_t& at, Progress& wp) const;
    void put_data(uint64_t rel, std::span<const std::byte> d) {
        if (data_sink_) data_sink_->write_at(data_base_ + rel, d);
    }

    int in_, out_;
    EncodeOptions o_;
    Progress progress_;
    int spooled_in_ = -1;  // the input copied to a temporary file, when IN is a pipe
    int src_ = -1;         // what passes read: in_ or spooled_in_
    uint64_t in_size_ = 0;
    uint64_t vsize_ = 0;
    uint64_t cs_ = 0;
    ClusterGeometry g_;
    std::vector<std::pair<uint64_t, uint64_t>> ranges_;  // of IN that may hold data
    bool direct_ = false;   // OUT is a regular file: data is written in place during pass 1
    Layout layout_;         // planned before pass 1 when direct_
    std::vector<Placed> placed_;  // guest order
    int spool_ = -1;              // the compressed data area when OUT is not a regular file
    std::unique_ptr<RawSink> data_sink_;
    uint64_t data_base_ = 0;  // offset of the data area in data_sink_'s file
    uint64_t data_len_ = 0;   // bytes of the data area so far
    uint64_t scanned_ = 0;
    EncodeStats stats_;
};

void Encoder::scan_uncompressed() {
    std::vector<std::byte> buf(kChunk);
    for (auto [start, end] : ranges_) {
        for (uint64_t at = start; at < end; at += kChunk) {
            size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, end - at));
            pread_all(src_, std::span(buf).first(n), at, "the input");
            if (n % cs_) std::memset(buf.data() + n, 0, cs_ - n % cs_);
            for (size_t off = 0; off < n; off += cs_) {
                auto cl = std::span(buf).subspan(off, cs_);
                if (all_zero(cl)) continue;
                placed_.push_back({(at + off) / cs_, data_len_, static_cast<uint32_t>(cs_), false});
                put_data(data_len_, cl);
                data_len_ += cs_;
            }
            scanned_ = at + n;
            progress_.update(scanned_, "scanning");
        }
    }
}

void Encoder::on_compressed(Batch& b) {
    auto& cb = static_cast<CompressBatch&>(b);
    for (size_t i = 0; i < cb.results.size(); ++i) {
        const auto& r = cb.results[i];
        if (r.kind == CompressBatch::Result::zero) continue;
        uint64_t c = cb.first_cluster + i;
        if (r.kind == CompressBatch::Result::compressed) {
            placed_.push_back({c, data_len_, static_cast<uint32_t>(r.length), true});
            put_data(data_len_, std::span(cb.out.get() + r.offset, r.length));
            data_len_ += r.length;
            ++stats_.compressed_clusters;
        } else {
            // An uncompressed cluster in the data area must start on a cluster boundary.
            uint64_t aligned = (data_len_ + cs_ - 1) & ~(cs_ - 1);
            if (aligned > data_len_ && data_sink_) data_sink_->write_zeros(data_base_ + data_len_, aligned - data_len_);
            data_len_ = aligned;
            placed_.push_back({c, data_len_, static_cast<uint32_t>(cs_), false});
            put_data(data_len_, std::span(cb.in.get() + r.offset, cs_));
            data_len_ += cs_;
        }
    }
    scanned_ = std::max(scanned_, cb.first_cluster * cs_ + cb.in_size);
    progress_.update(std::min(scanned_, vsize_), "compressing");
}

void Encoder::scan_compressed() {
    unsigned threads = o_.threads ? o_.threads : default_threads();
    OrderedPool pool(threads, threads * 2);
    auto done = [this](Batch& b) { on_compressed(b); };
    for (auto [start, end] : ranges_) {
        for (uint64_t at = start; at < end; at += kChunk) {
            size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, end - at));
            auto b = std::make_unique<CompressBatch>();
            b->type = *o_.compression;
            b->cs = cs_;
            b->first_cluster = at / cs_;
            b->in_size = (n + cs_ - 1) / cs_ * cs_;
            b->in = std::make_unique_for_overwrite<std::byte[]>(b->in_size);
            pread_all(src_, std::span(b->in.get(), n), at, "the input");
            std::memset(b->in.get() + n, 0, b->in_size - n);
            pool.submit(std::move(b), done);
            pool.poll(done);
        }
    }
    pool.drain(done);
}

EncodeStats Encoder::run() {
    cs_ = uint64_t{1} << o_.cluster_bits;
    g_ = ClusterGeometry{o_.cluster_bits, false};
    std::string dir = o_.spill_dir.empty() ? default_temp_dir() : o_.spill_dir;
    if (fd_kind(in_) == FdKind::other) {
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
    const uint64_t l1_entries = g_.l1_entries_for(vsize_);
    if (l1_entries * 8 > format::kMaxL1Bytes)
        fail(EFBIG, "the disk is too large for cluster size " + std::to_string(cs_) + " (L1 table over 32 MiB)");
    for_each_data_range(src_, in_size_, cs_, [&](uint64_t s, uint64_t e) { ranges_.emplace_back(s, e); });

    direct_ = fd_kind(out_) == FdKind::regular;
    if (direct_) {
        uint64_t max_clusters = 0, max_l2 = 0, last_l1 = UINT64_MAX;
        for (auto [s, e] : ranges_) {
            max_clusters += (e - s + cs_ - 1) / cs_;
            for (uint64_t i = s / cs_ / g_.l2_entries(); i <= (e - 1) / cs_ / g_.l2_entries(); ++i)
                if (i != last_l1) ++max_l2, last_l1 = i;
        }
        layout_ = plan_layout(cs_, o_.cluster_bits, (l1_entries * 8 + cs_ - 1) / cs_, max_l2,
                              o_.compression ? 2 * max_clusters : max_clusters);
        data_sink_ = std::make_unique<RawSink>(out_, true);
        data_base_ = layout_.data_offset;
    } else if (o_.compression) {
        spool_ = open_temp_file(dir, "data");
        data_sink_ = std::make_unique<RawSink>(spool_, false);
    }
    if (o_.compression)
        scan_compressed();
    else
        scan_uncompressed();
    if (data_sink_) data_sink_->flush();
    progress_.finish(vsize_, o_.compression ? "compressed" : "scanned");
    write_image();
    return stats_;
}

uint64_t MetadataPlan::refcount(uint64_t cl) const {
    if (cl >= dc) return data_refs[cl - dc];
    if (cl >= l.l2_offset / cs) return cl - l.l2_offset / cs < l2_count ? 1 : 0;
    return 1;  // header, refcount table and blocks, L1
}

MetadataPlan Encoder::plan_metadata() const {
    MetadataPlan m;
    m.cs = cs_;
    m.l1_entries = g_.l1_entries_for(vsize_);
    m.l1_clusters = (m.l1_entries * 8 + cs_ - 1) / cs_;
    // L2 tables: one per L1 index holding a stored cluster, in guest order.
    const uint64_t l2e = g_.l2_entries();
    m.l2_index_of_l1.assign(m.l1_entries, UINT64_MAX);
    for (const auto& p : placed_)
        if (m.l2_index_of_l1[p.guest_cluster / l2e] == UINT64_MAX) m.l2_index_of_l1[p.guest_cluster / l2e] = m.l2_count++;
    m.data_clusters = (data_len_ + cs_ - 1) / cs_;
    m.l = direct_ ? layout_ : plan_layout(cs_, o_.cluster_bits, m.l1_clusters, m.l2_count, m.data_clusters);
    if (m.l2_count > m.l.l2_slots) fail(EIO, "internal error: more L2 tables than planned");
    m.dc = m.l.data_offset / cs_;
    m.total_clusters = m.dc + m.data_clusters;
    m.per_block = format::refcount_block_entries(o_.cluster_bits, kRefcountOrder);
    if (m.total_clusters > m.l.blocks * m.per_block) fail(EIO, "internal error: refcount blocks too few");
    return m;
}

void Encoder::fill_l2_and_refcounts(MetadataPlan& m) const {
    // Refcounts: 1 for every metadata cluster in use and every uncompressed data cluster; a host
    // cluster holding compressed data counts each compressed cluster whose descriptor range
    // touches it; unused L2 room (direct_) stays 0.
    const uint64_t l2e = g_.l2_entries();
    m.data_refs.assign(m.data_clusters, 0);
    m.l2.assign(m.l2_count * cs_, std::byte{0});
    for (const auto& p : placed_) {
        uint64_t host = m.l.data_offset + p.offset;
        uint64_t raw;
        if (p.compressed) {
            raw = format::encode_l2_compressed(host, p.length, o_.cluster_bits);
            auto e = format::decode_l2(raw, 0, g_, 3);
            uint64_t first = e.host_offset / cs_ - m.dc;
            uint64_t last = (e.host_offset + e.compressed_size - 1) / cs_ - m.dc;
            for (uint64_t i = first; i <= last && i < m.data_clusters; ++i) ++m.data_refs[i];
        } else {
            raw = format::encode_l2_standard(host, true, false);
            m.data_refs[p.offset / cs_] = 1;
        }
        uint64_t table = m.l2_index_of_l1[p.guest_cluster / l2e];
        format::store_be64(m.l2.data() + table * cs_ + (p.guest_cluster % l2e) * 8, raw);
    }
    for (uint16_t r : m.data_refs)
        if (r == 0 || r > format::max_refcount(kRefcountOrder))
            fail(EIO, "internal error: a data cluster without references or with too many");
}

std::vector<std::byte> Encoder::header_cluster(const MetadataPlan& m) const {
    format::ImageMetadata meta;
    format::Header& h = meta.header;
    h.version = 3;
    h.cluster_bits = o_.cluster_bits;
    h.size = vsize_;
    h.l1_size = static_cast<uint32_t>(m.l1_entries);
    h.l1_table_offset = m.l.l1_offset;
    h.refcount_table_offset = m.l.rt_offset;
    h.refcount_table_clusters = static_cast<uint32_t>(m.l.rt_clusters);
    h.refcount_order = kRefcountOrder;
    h.header_length = format::kV3MinHeaderLength;
    h.compression_type = o_.compression.value_or(format::CompressionType::zlib);
    if (h.compression_type != format::CompressionType::zlib) h.incompatible_features |= format::kIncompatCompressionType;
    std::vector<std::byte> cluster0 = format::serialize_metadata(meta);
    cluster0.resize(cs_);
    return cluster0;
}

uint64_t Encoder::write_metadata(RawSink& out, const MetadataPlan& m) const {
    uint64_t at = 0;
    auto put = [&](std::span<const std::byte> d) {
        out.write_at(at, d);
        at += d.size();
    };
    put(header_cluster(m));
    std::vector<std::byte> rt(m.l.rt_clusters * cs_);
    for (uint64_t b = 0; b < m.l.blocks; ++b) format::store_be64(rt.data() + b * 8, m.l.rb_offset + b * cs_);
    put(rt);
    std::vector<std::byte> block(cs_);
    for (uint64_t b = 0; b < m.l.blocks; ++b) {
        std::fill(block.begin(), block.end(), std::byte{0});
        for (uint64_t i = 0; i < m.per_block && b * m.per_block + i < m.total_clusters; ++i)
            format::set_refcount(block, kRefcountOrder, i, m.refcount(b * m.per_block + i));
        put(block);
    }
    std::vector<std::byte> l1(m.l1_clusters * cs_);
    for (uint64_t i = 0; i < m.l1_entries; ++i)
        if (m.l2_index_of_l1[i] != UINT64_MAX)
            format::store_be64(l1.data() + i * 8, format::encode_l1({m.l.l2_offset + m.l2_index_of_l1[i] * cs_, true}));
    put(l1);
    put(m.l2);
    return at;
}

void Encoder::copy_spooled_data(RawSink& out, uint64_t& at, Progress& wp) const {
    std::vector<std::byte> buf(kChunk);
    for (uint64_t done = 0; done < data_len_;) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, data_len_ - done));
        pread_all(spool_, std::span(buf).first(n), done, "the data spool file");
        out.write_at(at, std::span(buf).first(n));
        at += n;
        done += n;
        wp.update(done);
    }
}

void Encoder::copy_input_clusters(RawSink& out, uint64_t& at, Progress& wp) const {
    std::vector<std::byte> buf(kChunk);
    const uint64_t data_start = at;
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
        out.write_at(at, std::span(buf).first(n));
        at += n;
        i = j;
        wp.update(at - data_start);
    }
}

void Encoder::write_image() {
    MetadataPlan m = plan_metadata();
    fill_l2_and_refcounts(m);
    // The metadata goes out in file order: to a pipe sequentially, to a file in front of the
    // data already written.
    RawSink out(out_, direct_);
    uint64_t at = write_metadata(out, m);
    m.l2 = {};
    const uint64_t end = m.l.data_offset + m.data_clusters * cs_;
    stats_.data_clusters = placed_.size();
    if (direct_) {
        out.flush();
        // The last host cluster is whole, so that every cluster the refcounts count exists;
        // unused L2 room stays a hole.
        if (::ftruncate(out_, static_cast<off_t>(end)) != 0) fail(errno, "cannot set the size of the output");
        stats_.image_bytes = end;
        return;
    }
    if (at < m.l.data_offset) out.write_zeros(at, m.l.data_offset - at), at = m.l.data_offset;
    Progress wp(o_.progress, "encode: writing");
    wp.set_total(m.data_clusters * cs_);
    if (o_.compression)
        copy_spooled_data(out, at, wp);
    else
        copy_input_clusters(out, at, wp);
    if (end > at) out.write_zeros(at, end - at), at = end;
    out.flush();
    wp.finish(at - m.l.data_offset);
    stats_.image_bytes = at;
}

}  // namespace

EncodeStats encode(int in_fd, int out_fd, const EncodeOptions& options) {
    Encoder e(in_fd, out_fd, options);
    return e.run();
}

}  // namespace qcowfs::stream
