// The stream decoder: classifies each host cluster as it passes, retains what is not yet mapped.
//
// A qcow2 file is read once, front to back. A host cluster is, by the time it arrives, one of:
//   - part of the active L1 table (its place is in the header);
//   - an L2 table named by an L1 entry already read;
//   - a data cluster named by an L2 entry already read (normal, or holding compressed clusters);
//   - the refcount table (its place is in the header) or a refcount block it names: skipped;
//   - not yet known: it may still turn out to be an L2 table or data once a later table names it.
// Unknown clusters are retained (RetainedStore: memory up to --memory, then a spill file) until the
// mapping is complete — the L1 table and every L2 table it names have been read — and then all
// retained clusters that nothing claimed are dropped, as is every later unclaimed cluster. A
// cluster that compressed clusters already named fill is not retained: only the sectors where two
// of them meet, in case a later table names a small one there (named_compressed_covers).
// When a table names a cluster that has already passed, it is taken from the retained store; if it
// is not there it was already used as something else, and the stream is rejected (mapped twice).
#include "stream/decoder.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "qcowfs/codec/compression.hpp"
#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/header.hpp"
#include "stream/ordered_pool.hpp"
#include "stream/progress.hpp"
#include "stream/raw_sink.hpp"
#include "stream/retained_store.hpp"
#include "stream/sysio.hpp"

namespace qcowfs::stream {

namespace {

using format::L2Entry;
using format::SubclusterType;

constexpr uint64_t kUnknownFileSize = uint64_t{1} << 62;  // the stream's length is not known up front
constexpr size_t kMinClusterBytes = 512;
// Small enough that a chunk is still in the CPU's cache when it is written out (measured with
// contrib/bench/stream.py: 256 KiB beat 1 and 4 MiB by about a fifth).
constexpr size_t kReadChunk = 256u << 10;
constexpr size_t kInputPipeBytes = 1u << 20;  // asked for when the input is a pipe (grow_pipe)
constexpr uint64_t kGuestKeyBit = uint64_t{1} << 63;  // RetainedStore keys: host offsets, or this | guest cluster
constexpr size_t kBatchInputBytes = 1u << 20;
constexpr size_t kBatchMaxItems = 256;
constexpr size_t kBatchOutputBytes = 8u << 20;  // bounds a batch's output for large clusters
constexpr size_t kSparseBlock = 64u << 10;  // zero detection granularity for sparse output
constexpr int kMaxBackingDepth = 16;
constexpr uint64_t kSectorBytes = 512;
constexpr size_t kMaxLooseSectors = 8;  // per host cluster, and at most 1/8 of it

[[noreturn]] void bad(const std::string& what) { corrupt("bad stream: " + what); }

/// A raw view of the backing file: zeros past its end. A qcow2 backing file is first decoded into
/// an anonymous temporary file (its own backing file is found by the name in its header).
class BackingSource {
public:
    BackingSource(const std::string& path, const DecodeOptions& o, int depth) {
        int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) fail(errno, "cannot open backing file " + path);
        std::byte magic[4]{};
        ssize_t n = ::pread(fd, magic, 4, 0);
        if (n == 4 && format::has_qcow2_magic(magic)) {
            if (depth >= kMaxBackingDepth) {
                ::close(fd);
                fail(ELOOP, "backing chain deeper than " + std::to_string(kMaxBackingDepth) + " at " + path);
            }
            int raw = open_temp_file(o.spill_dir.empty() ? default_temp_dir() : o.spill_dir, "backing");
            DecodeOptions bo;
            bo.sparse = true;
            bo.memory = o.memory;
            bo.spill_dir = o.spill_dir;
            bo.threads = o.threads;
            try {
                decode_with_depth(fd, raw, bo, path, depth + 1);
            } catch (const std::system_error& e) {
                ::close(fd);
                ::close(raw);
                fail(errno_of(e), "backing file " + path + ": " + reason_of(e));
            }
            ::close(fd);
            fd = raw;
        }
        fd_ = fd;
        size_ = fd_size(fd_);
    }
    ~BackingSource() { ::close(fd_); }
    BackingSource(const BackingSource&) = delete;
    BackingSource& operator=(const BackingSource&) = delete;

    /// Fills `out` with the backing disk's bytes at `offset` (zeros past its end).
    void read(uint64_t offset, std::span<std::byte> out) const {
        uint64_t have = offset < size_ ? std::min<uint64_t>(size_ - offset, out.size()) : 0;
        if (have) pread_all(fd_, out.first(have), offset, "the backing file");
        std::memset(out.data() + have, 0, out.size() - have);
    }

    static DecodeStats decode_with_depth(int in, int out, const DecodeOptions& o, const std::string& path,
                                         int depth);

private:
    int fd_ = -1;
    uint64_t size_ = 0;
};

/// A run of compressed clusters to decompress on a worker.
struct DecompressBatch : Batch {
    struct Item {
        uint64_t guest_cluster;
        uint64_t host_offset;
        size_t in_offset, in_length;  // in `in`
    };
    format::CompressionType type;
    size_t cluster_size;
    std::vector<Item> items;
    std::vector<std::byte> in;         // the compressed bytes of all items, back to back
    std::unique_ptr<std::byte[]> out;  // items.size() clusters

    DecompressBatch(format::CompressionType t, size_t cs) : type(t), cluster_size(cs) {
        in.reserve(kBatchInputBytes + 2 * cs + 512);
    }
    void run() override {
        out = std::make_unique_for_overwrite<std::byte[]>(items.size() * cluster_size);
        for (size_t i = 0; i < items.size(); ++i) {
            try {
                codec::decompress_cluster(type, std::span(in).subspan(items[i].in_offset, items[i].in_length),
                                          std::span(out.get() + i * cluster_size, cluster_size));
            } catch (const std::system_error& e) {
                fail(errno_of(e), "bad stream: compressed cluster at host offset " + hex(items[i].host_offset) +
                                      " (guest offset " + hex(items[i].guest_cluster * cluster_size) +
                                      ") does not decompress to a cluster: " + reason_of(e));
            }
        }
    }
};

/// Bytes of one compressed cluster being collected from the stream.
struct CompressedWant {
    uint64_t end;  // host byte offset one past the descriptor's last byte
    uint64_t guest_cluster;
    std::unique_ptr<std::byte[]> buf;  // end - start bytes, allocated when the first byte arrives
};

class Decoder {
public:
    Decoder(int in, int out, bool positioned, const DecodeOptions& o, std::string name, int depth)
        : in_(in), out_fd_(out), positioned_(positioned), o_(o), name_(std::move(name)), depth_(depth),
          progress_(o.progress, "decode") {}

    DecodeStats run();

private:
    // --- input ---
    /// Reads and checks cluster 0; refuses encrypted images, external data files, and backing
    /// files without --backing (ENOTSUP). Throws EIO naming the problem for a bad header.
    void read_header();
    /// Reads cluster 0 (fewer bytes only if the stream ends first) and parses the header and its
    /// extensions into meta_; returns the bytes read. EIO for a bad header, ENOTSUP for an
    /// unsupported feature.
    size_t read_cluster0();
    /// ENOTSUP for encrypted images and external data files: the stream does not hold the disk.
    void check_supported() const;
    /// Opens --backing (or, for a backing file, the one its header names); ENOTSUP without one.
    void open_backing();
    /// Classifies the host cluster at `host` (cs_ bytes, `valid` of them from the stream: fewer
    /// only for the last one) and acts on it: table parsed, data written or queued for
    /// decompression, or kept in the retained store. May write output, wait for a decompression
    /// batch (bounded queue) and spill to disk. Throws EIO ("bad stream: ...") on corruption.
    void on_host_cluster(uint64_t host, std::span<const std::byte> data, size_t valid);

    // --- mapping ---
    void parse_l1();
    /// register_*: a table names `host`. Already passed: taken from the retained store and used
    /// now (EIO if it is not there: it was used as something else). Still to come: remembered.
    /// EIO for offsets in the header, the L1 table or refcount metadata, or named twice.
    /// EIO ("bad stream") unless `host` may become a newly named cluster: not the header, the L1
    /// table, refcount structures, or a cluster another entry already names.
    void check_new_cluster(uint64_t host, const std::string& what) const;
    void register_l2(uint64_t host, uint64_t l1_index);
    void parse_l2(uint64_t l1_index, uint64_t host, std::span<const std::byte> table);
    void register_data(uint64_t guest_cluster, uint64_t host, bool needs_data);
    void register_compressed(uint64_t guest_cluster, const L2Entry& e);
    void feed_compressed(uint64_t host, std::span<const std::byte> data, size_t valid);
    /// Sectors of a host cluster that a compressed cluster named later may still need.
    struct LooseSectors {
        std::array<uint64_t, kMaxLooseSectors> at;
        size_t count = 0;
    };
    /// True when every byte of host cluster `host` belongs to compressed clusters already named,
    /// except for a few 512-byte sectors (put in `loose`) where one of them ends and the next
    /// begins: a compressed cluster named later could hide there. Such a cluster need not be
    /// retained, only those sectors.
    bool named_compressed_covers(uint64_t host, LooseSectors& loose) const;
    /// Copies [at, at + out.size()) from loose_ if every sector of it is there.
    bool read_loose(uint64_t at, std::span<std::byte> out) const;
    void queue_decompress(uint64_t guest_cluster, uint64_t host_offset, std::span<const std::byte> in);
    void submit_batch();
    void check_mapping_complete();
    bool in_refcount_table(uint64_t host) const {
        return host >= h_.refcount_table_offset &&
               host < h_.refcount_table_offset + (uint64_t{h_.refcount_table_clusters} << cb_);
    }
    /// Refcount metadata is known from the header and the refcount table: it is never retained.
    void on_refcount_table(uint64_t host, std::span<const std::byte> data, size_t valid);
    void check_not_refcount(uint64_t host, const std::string& what) const {
        if (in_refcount_table(host) || refblocks_.count(host))
            bad(what + " at offset " + hex(host) + " overlaps refcount metadata");
    }
    bool in_l1_table(uint64_t host) const {
        return l1_len_ && host + cs_ > l1_offset_ && host < l1_offset_ + l1_len_;
    }
    bool claimed(uint64_t host) const {
        uint64_t i = host >> cb_;
        return i / 64 < claimed_.size() && (claimed_[i / 64] >> (i % 64) & 1);
    }
    void claim(uint64_t host) {
        uint64_t i = host >> cb_;
        if (i / 64 >= claimed_.size()) claimed_.resize(i / 64 + 1 + claimed_.size() / 2);
        claimed_[i / 64] |= uint64_t{1} << (i % 64);
    }
    /// Takes an already passed host cluster out of the retained store for `what`; a cluster that
    /// is not there was used for something else already.
    void take_past(uint64_t host, std::span<std::byte> out, const std::string& what);
    L2Entry entry(uint64_t guest_cluster) const;

    // --- output ---
    std::span<const std::byte> compose(uint64_t guest_cluster, const L2Entry& e, const std::byte* host_data);
    void cluster_ready(uint64_t guest_cluster, std::span<const std::byte> data);
    void resolved_without_data(uint64_t guest_cluster, const L2Entry& e);
    void resolve_unallocated(uint64_t first_cluster, uint64_t end_cluster);
    void write_sparse(uint64_t guest_cluster, std::span<const std::byte> data);
    void advance();
    uint64_t guest_len(uint64_t guest_cluster) const {
        return std::min<uint64_t>(cs_, h_.size - guest_cluster * cs_);
    }
    void on_batch_done(Batch& b);
    /// Reads the stream after cluster 0 to its end, a chunk at a time, handing each host cluster
    /// to on_host_cluster. The chunk is read into the next input buffer that the sink no longer
    /// writes from, while the sink's thread writes what came before.
    void read_stream();
    void report_progress() { progress_.update(done_, "read " + human_bytes(static_cast<double>(pos_))); }
    /// At the end of the stream: drains the decompression queue, reports the first table or
    /// cluster still missing (EIO, "lies past the end of the stream"), flushes the output.
    void finish();

    int in_;
    int out_fd_;
    bool positioned_;
    DecodeOptions o_;
    std::string name_;
    int depth_;
    Progress progress_;

    format::ImageMetadata meta_;
    format::Header h_;
    ClusterGeometry g_;
    uint32_t cb_ = 16;
    uint64_t cs_ = 0;
    uint64_t nclusters_ = 0;  // guest clusters
    uint64_t l2_entries_ = 0;
    bool sparse_ = false;
    std::unique_ptr<BackingSource> backing_;

    uint64_t pos_ = 0;  // stream bytes consumed: every host cluster below is classified
    std::vector<uint64_t> claimed_;  // bit per passed host cluster used as table or data

    uint64_t l1_offset_ = 0, l1_len_ = 0, l1_filled_ = 0;
    std::vector<std::byte> l1_bytes_;
    bool l1_known_ = false;
    std::vector<uint64_t> l1_;  // L2 table offsets (0: none), one per L1 index that maps the disk
    // By L1 index: empty until read, and again once no cluster it maps is waiting for data
    // (sparse output) or the sequential output has passed it: only tables in use take memory.
    std::vector<std::vector<std::byte>> l2_tables_;
    std::vector<uint32_t> l2_pending_;  // by L1 index: clusters whose data has not been written
    uint64_t parsing_l1_ = UINT64_MAX;  // the L1 index whose table parse_l2 is walking
    /// Frees table l1i, unless parse_l2 is still walking it: a cluster it resolves on the way
    /// (data that has passed, a finished decompression batch) may complete the table's output
    /// before the walk is done. parse_l2 frees it at the end if nothing needs it any more.
    void release_table(uint64_t l1i) {
        if (l1i != parsing_l1_) std::vector<std::byte>().swap(l2_tables_[l1i]);
    }
    std::unordered_set<uint64_t> refblocks_;  // refcount blocks named by the refcount table, not yet passed
    std::unordered_map<uint64_t, uint64_t> l2_wanted_;    // host offset -> L1 index
    std::unordered_map<uint64_t, uint64_t> data_wanted_;  // host offset -> guest cluster | kGuestKeyBit if data needed
    std::map<uint64_t, CompressedWant> compressed_wanted_;  // by host byte offset
    // Sectors kept from clusters that compressed data already named covers (named_compressed_covers),
    // by host byte offset, until the mapping is complete.
    std::unordered_map<uint64_t, std::array<std::byte, kSectorBytes>> loose_;
    bool mapping_complete_ = false;

    std::unique_ptr<RetainedStore> store_;
    std::unique_ptr<OrderedPool> pool_;
    std::unique_ptr<DecompressBatch> batch_;
    struct InputBuffer {
        std::vector<std::byte> bytes;
        uint64_t written_ticket = 0;  // the sink's flush that covers every write from bytes
    };
    std::array<InputBuffer, 3> inputs_;  // declared before sink_: its writer may read them to the end
    std::unique_ptr<RawSink> sink_;
    std::vector<std::byte> compose_buf_, take_buf_, zeros_;

    uint64_t cursor_ = 0;  // sequential output: next guest cluster to write
    uint64_t done_ = 0;    // guest bytes resolved (written, or known to be zeros / holes)
    DecodeStats stats_;
};

size_t Decoder::read_cluster0() {
    std::vector<std::byte> first(kMinClusterBytes);
    size_t n = read_full(in_, first, "the input");
    pos_ = n;
    if (n >= 4 && !format::has_qcow2_magic(first)) bad("not a qcow2 image: no QFI\\xfb magic at offset 0x0");
    if (n < 104 && n < format::kV2HeaderLength)
        bad("the stream ends at offset " + hex(n) + ", inside the qcow2 header");
    uint32_t bits = format::load_be32(first.data() + 20);
    if (bits < format::kMinClusterBits || bits > format::kMaxClusterBits) {
        try {
            format::parse_header(std::span(first).first(n), kUnknownFileSize);
        } catch (const std::system_error& e) {
            bad("header at offset 0x0: " + reason_of(e));
        }
        bad("header at offset 0x0: invalid cluster_bits " + std::to_string(bits));
    }
    uint64_t cs = uint64_t{1} << bits;
    std::vector<std::byte> cluster0(cs);
    std::memcpy(cluster0.data(), first.data(), n);
    if (n == kMinClusterBytes && cs > n) {
        size_t more = read_full(in_, std::span(cluster0).subspan(n), "the input");
        pos_ += more;
        n += more;
    }
    try {
        meta_ = format::parse_metadata(std::span(cluster0).first(n), kUnknownFileSize);
    } catch (const std::system_error& e) {
        if (errno_of(e) == ENOTSUP) fail(ENOTSUP, "unsupported image: " + reason_of(e));
        bad("header at offset 0x0: " + reason_of(e));
    }
    if (n < cs && n < meta_.header.l1_table_offset)
        bad("the stream ends at offset " + hex(n) + ", inside the header cluster");
    return n;
}

void Decoder::check_supported() const {
    if (h_.crypt_method != 0 || meta_.extensions.has_crypto_header)
        fail(ENOTSUP, std::string("unsupported image: it is encrypted (") + (h_.crypt_method == 1 ? "AES" : "LUKS") +
                          "); decrypt it first with qemu-img convert");
    if (h_.has_external_data_file())
        fail(ENOTSUP, "unsupported image: its data is in an external data file (" +
                          meta_.extensions.data_file.value_or("?") +
                          "), which is not part of the stream; use qemu-img convert on the files");
}

void Decoder::open_backing() {
    std::string path = o_.backing;
    if (path.empty() && depth_ > 0 && !name_.empty()) {
        // A backing file's own backing file is named in its header, relative to its directory.
        path = meta_.backing_file;
        if (path.front() != '/') {
            auto slash = name_.rfind('/');
            path = (slash == std::string::npos ? std::string(".") : name_.substr(0, slash)) + "/" + path;
        }
    }
    if (path.empty())
        fail(ENOTSUP, "the image has a backing file (" + meta_.backing_file +
                          ") whose data the stream does not contain; pass --backing FILE with a raw or "
                          "qcow2 copy of it");
    backing_ = std::make_unique<BackingSource>(path, o_, depth_);
}

void Decoder::read_header() {
    size_t n = read_cluster0();
    h_ = meta_.header;
    g_ = h_.geometry();
    cb_ = h_.cluster_bits;
    cs_ = h_.cluster_size();
    l2_entries_ = g_.l2_entries();
    nclusters_ = (h_.size + cs_ - 1) / cs_;
    check_supported();
    if (!meta_.backing_file.empty()) open_backing();

    l1_offset_ = h_.l1_table_offset;
    l1_len_ = std::min<uint64_t>(h_.l1_size, g_.l1_entries_for(h_.size)) * 8;
    l1_bytes_.resize(l1_len_);
    l1_.assign(l1_len_ / 8, 0);
    l2_tables_.resize(l1_len_ / 8);
    l2_pending_.assign(l1_len_ / 8, 0);
    stats_.virtual_size = h_.size;
    progress_.set_total(h_.size);

    // Whatever followed cluster 0 in the first read (clusters smaller than 512 bytes do not
    // exist, so with cs == 512 nothing did) is handled by the main loop.
    pos_ = cs_ <= n ? cs_ : n;
}

void Decoder::take_past(uint64_t host, std::span<std::byte> out, const std::string& what) {
    if (store_->contains(host)) {
        store_->take(host, out);
        return;
    }
    if (host < cs_) bad(what + " points into the header (offset " + hex(host) + ")");
    if (in_l1_table(host)) bad(what + " at offset " + hex(host) + " overlaps the L1 table");
    if (claimed(host))
        bad(what + " at offset " + hex(host) + " is mapped twice: that cluster is already used as a table or data");
    bad(what + " at offset " + hex(host) + " was not kept: nothing named it before the mapping was complete");
}

void Decoder::on_host_cluster(uint64_t host, std::span<const std::byte> data, size_t valid) {
    pos_ = host + valid;
    bool used = false;
    if (in_refcount_table(host)) {
        on_refcount_table(host, data, valid);
        claim(host);
        used = true;
    } else if (refblocks_.erase(host)) {
        claim(host);
        used = true;
    } else if (in_l1_table(host)) {
        uint64_t from = std::max(host, l1_offset_), to = std::min(host + cs_, l1_offset_ + l1_len_);
        if (to > host + valid)
            bad("the stream ends at offset " + hex(host + valid) + ", inside the L1 table at " + hex(l1_offset_));
        std::memcpy(l1_bytes_.data() + (from - l1_offset_), data.data() + (from - host), to - from);
        l1_filled_ += to - from;
        claim(host);
        used = true;
        if (l1_filled_ == l1_len_) parse_l1();
    } else if (auto it = l2_wanted_.find(host); it != l2_wanted_.end()) {
        uint64_t l1i = it->second;
        l2_wanted_.erase(it);
        if (valid < cs_) bad("the stream ends at offset " + hex(host + valid) + ", inside the L2 table at " + hex(host));
        claim(host);
        used = true;
        parse_l2(l1i, host, data);
    } else if (auto dt = data_wanted_.find(host); dt != data_wanted_.end()) {
        uint64_t v = dt->second;
        data_wanted_.erase(dt);
        claim(host);
        used = true;
        if (v & kGuestKeyBit) {
            uint64_t c = v & ~kGuestKeyBit;
            if (valid < guest_len(c))
                bad("the stream ends at offset " + hex(host + valid) + ", inside the data cluster at " + hex(host) +
                    " (guest offset " + hex(c * cs_) + ")");
            L2Entry e = entry(c);
            cluster_ready(c, compose(c, e, data.data()));
        }
    }
    if (!used) {
        LooseSectors loose;
        bool covered = !mapping_complete_ && valid == cs_ && named_compressed_covers(host, loose);
        feed_compressed(host, data, valid);
        if (covered) {
            claim(host);  // compressed data already named: no later table may name this cluster
            for (size_t i = 0; i < loose.count; ++i)
                std::memcpy(loose_[loose.at[i]].data(), data.data() + (loose.at[i] - host), kSectorBytes);
        } else if (!mapping_complete_) {
            store_->put(host, data);
        }
    }
    check_mapping_complete();
}

void Decoder::on_refcount_table(uint64_t, std::span<const std::byte> data, size_t valid) {
    for (size_t at = 0; at + 8 <= valid; at += 8) {
        uint64_t block = format::load_be64(data.data() + at) & format::kRefcountTableOffsetMask;
        if (!block || block < cs_ || (block & (cs_ - 1))) continue;  // not ours to judge: refcounts are not read
        if (block >= pos_)
            refblocks_.insert(block);
        else if (store_->contains(block)) {
            store_->erase(block);
            claim(block);
        }
    }
}

void Decoder::check_mapping_complete() {
    if (mapping_complete_ || !l1_known_ || !l2_wanted_.empty()) return;
    mapping_complete_ = true;
    loose_.clear();
    store_->erase_if([](uint64_t key) { return !(key & kGuestKeyBit); });
}

void Decoder::parse_l1() {
    l1_known_ = true;
    for (uint64_t i = 0; i < l1_.size(); ++i) {
        uint64_t raw = format::load_be64(l1_bytes_.data() + i * 8);
        format::L1Entry e;
        try {
            e = format::decode_l1(raw, cb_);
        } catch (const std::system_error& err) {
            bad("L1 table at " + hex(l1_offset_) + ", entry " + std::to_string(i) + ": " + reason_of(err));
        }
        l1_[i] = e.l2_offset;
    }
    l1_bytes_ = {};
    for (uint64_t i = 0; i < l1_.size(); ++i) {
        if (l1_[i])
            register_l2(l1_[i], i);
        else
            resolve_unallocated(i * l2_entries_, std::min(nclusters_, (i + 1) * l2_entries_));
    }
    advance();
}

void Decoder::check_new_cluster(uint64_t host, const std::string& what) const {
    if (host < cs_) bad(what + " points into the header (offset " + hex(host) + ")");
    if (in_l1_table(host)) bad(what + " at offset " + hex(host) + " overlaps the L1 table");
    check_not_refcount(host, what);
    if (l2_wanted_.count(host) || data_wanted_.count(host))
        bad(what + " at offset " + hex(host) + " is mapped twice");
}

void Decoder::register_l2(uint64_t host, uint64_t l1i) {
    std::string what = "L2 table for L1 index " + std::to_string(l1i);
    check_new_cluster(host, what);
    if (host < pos_) {
        std::vector<std::byte> table(cs_);
        take_past(host, table, what);
        claim(host);
        parse_l2(l1i, host, table);
    } else {
        l2_wanted_.emplace(host, l1i);
    }
}

L2Entry Decoder::entry(uint64_t c) const {
    const auto& t = l2_tables_[c / l2_entries_];
    const std::byte* p = t.data() + (c % l2_entries_) * g_.l2_entry_size();
    return format::decode_l2(format::load_be64(p), g_.extended_l2 ? format::load_be64(p + 8) : 0, g_, h_.version);
}

void Decoder::parse_l2(uint64_t l1i, uint64_t host, std::span<const std::byte> table) {
    l2_tables_[l1i].assign(table.begin(), table.begin() + cs_);
    parsing_l1_ = l1i;
    uint64_t first = l1i * l2_entries_, last = std::min(nclusters_, first + l2_entries_);
    for (uint64_t c = first; c < last; ++c) {
        L2Entry e;
        try {
            e = entry(c);
        } catch (const std::system_error& err) {
            bad("L2 table at " + hex(host) + ", entry " + std::to_string(c - first) + " (guest offset " +
                hex(c * cs_) + "): " + reason_of(err));
        }
        if (e.compressed) {
            ++l2_pending_[l1i];
            register_compressed(c, e);
            continue;
        }
        bool needs_data = false;
        for (uint32_t sc = 0; sc < g_.subclusters_per_cluster(); ++sc)
            needs_data |= format::subcluster_type(e, sc, g_) == SubclusterType::normal;
        if (needs_data) ++l2_pending_[l1i];
        if (e.host_offset) register_data(c, e.host_offset, needs_data);
        if (!needs_data) resolved_without_data(c, e);
    }
    parsing_l1_ = UINT64_MAX;
    if (sparse_ ? l2_pending_[l1i] == 0 : cursor_ >= last) release_table(l1i);
    advance();
}

void Decoder::register_data(uint64_t c, uint64_t host, bool needs_data) {
    std::string what = "data cluster for guest offset " + hex(c * cs_);
    check_new_cluster(host, what);
    if (host < pos_) {
        if (!needs_data) {
            if (!store_->contains(host)) take_past(host, take_buf_, what);
            store_->erase(host);
            claim(host);
            return;
        }
        take_past(host, take_buf_, what);
        claim(host);
        L2Entry e = entry(c);
        cluster_ready(c, compose(c, e, take_buf_.data()));
    } else {
        data_wanted_.emplace(host, needs_data ? (c | kGuestKeyBit) : c);
    }
}

void Decoder::register_compressed(uint64_t c, const L2Entry& e) {
    uint64_t start = e.host_offset, end = e.host_offset + e.compressed_size;
    std::string what = "compressed cluster for guest offset " + hex(c * cs_);
    if (start < cs_) bad(what + " points into the header (offset " + hex(start) + ")");
    if (l1_len_ && start < l1_offset_ + l1_len_ && end > l1_offset_)
        bad(what + " at offset " + hex(start) + " overlaps the L1 table");
    if (compressed_wanted_.count(start)) bad(what + " at offset " + hex(start) + " is mapped twice");
    CompressedWant w{end, c, {}};
    if (start < pos_) {
        // Gather the part that has passed from the retained clusters it lies in.
        w.buf = std::make_unique_for_overwrite<std::byte[]>(end - start);
        uint64_t upto = std::min(end, pos_);
        for (uint64_t at = start; at < upto;) {
            uint64_t hc = at & ~(cs_ - 1), n = std::min(upto, hc + cs_) - at;
            std::span<std::byte> part(w.buf.get() + (at - start), n);
            if (store_->contains(hc))
                store_->read(hc, at - hc, part);
            else if (!read_loose(at, part))
                take_past(hc, take_buf_, what);  // reports why the bytes are gone
            at += n;
        }
        if (end <= pos_) {
            queue_decompress(c, start, std::span(w.buf.get(), end - start));
            return;
        }
    }
    compressed_wanted_.emplace(start, std::move(w));
}

void Decoder::feed_compressed(uint64_t host, std::span<const std::byte> data, size_t valid) {
    if (compressed_wanted_.empty()) return;
    uint64_t lookback = 2 * cs_ + 512;  // a compressed cluster spans at most 2 clusters plus a sector
    auto it = compressed_wanted_.lower_bound(host > lookback ? host - lookback : 0);
    while (it != compressed_wanted_.end() && it->first < host + cs_) {
        uint64_t start = it->first;
        CompressedWant& w = it->second;
        if (w.end <= host) {
            ++it;
            continue;
        }
        bool complete = w.end <= host + cs_ || valid < cs_;
        if (complete && start >= host + valid) {
            ++it;
            continue;  // starts past the end of the stream: reported at the end
        }
        // At the end of the stream the descriptor may reach past the end of the file: the codec
        // needs only the bytes that are there.
        uint64_t end = complete ? std::min(w.end, host + valid) : w.end;
        if (complete && !w.buf && start >= host) {
            // All of it is in this cluster: straight from the input buffer into the batch.
            queue_decompress(w.guest_cluster, start, data.subspan(start - host, end - start));
            it = compressed_wanted_.erase(it);
            continue;
        }
        if (!w.buf) w.buf = std::make_unique_for_overwrite<std::byte[]>(w.end - start);
        uint64_t from = std::max(start, host), to = std::min(w.end, host + cs_);
        std::memcpy(w.buf.get() + (from - start), data.data() + (from - host), to - from);
        if (complete) {
            queue_decompress(w.guest_cluster, start, std::span(w.buf.get(), end - start));
            it = compressed_wanted_.erase(it);
        } else {
            ++it;
        }
    }
}

bool Decoder::named_compressed_covers(uint64_t host, LooseSectors& loose) const {
    size_t max_loose = std::min<size_t>(kMaxLooseSectors, cs_ / kSectorBytes / 8);
    uint64_t end = host + cs_;
    uint64_t covered = host;  // [host, covered) surely belongs to compressed clusters named so far
    auto gap = [&](uint64_t from, uint64_t to) {
        for (uint64_t s = from & ~(kSectorBytes - 1); s < to; s += kSectorBytes) {
            if (loose.count && loose.at[loose.count - 1] == s) continue;
            if (loose.count == max_loose) return false;
            loose.at[loose.count++] = s;
        }
        return true;
    };
    uint64_t lookback = 2 * cs_ + kSectorBytes;
    for (auto it = compressed_wanted_.lower_bound(host > lookback ? host - lookback : 0);
         it != compressed_wanted_.end() && it->first < end; ++it) {
        uint64_t start = it->first, nominal_end = it->second.end;
        if (nominal_end <= host) continue;
        if (start > covered && !gap(covered, start)) return false;
        // Only its last sector may also hold the start of the next compressed cluster.
        covered = std::max({covered, start + 1, nominal_end - (kSectorBytes - 1)});
    }
    return covered >= end || gap(covered, end);
}

bool Decoder::read_loose(uint64_t at, std::span<std::byte> out) const {
    for (uint64_t s = at & ~(kSectorBytes - 1); s < at + out.size(); s += kSectorBytes) {
        auto it = loose_.find(s);
        if (it == loose_.end()) return false;
        uint64_t from = std::max(s, at), to = std::min(s + kSectorBytes, at + out.size());
        std::memcpy(out.data() + (from - at), it->second.data() + (from - s), to - from);
    }
    return true;
}

void Decoder::queue_decompress(uint64_t c, uint64_t host_offset, std::span<const std::byte> in) {
    if (!batch_) batch_ = std::make_unique<DecompressBatch>(h_.compression_type, cs_);
    batch_->items.push_back({c, host_offset, batch_->in.size(), in.size()});
    batch_->in.insert(batch_->in.end(), in.begin(), in.end());
    ++stats_.compressed_clusters;
    if (batch_->in.size() >= kBatchInputBytes || batch_->items.size() >= kBatchMaxItems ||
        batch_->items.size() * cs_ >= kBatchOutputBytes)
        submit_batch();
}

void Decoder::submit_batch() {
    if (!batch_ || batch_->items.empty()) return;
    pool_->submit(std::move(batch_), [this](Batch& b) { on_batch_done(b); });
}

void Decoder::on_batch_done(Batch& b) {
    auto& d = static_cast<DecompressBatch&>(b);
    // The sink writes the clusters from where they are and keeps the batch's output until it has
    // written them; then it points at the input buffer again.
    std::shared_ptr<std::byte[]> out(std::move(d.out));
    const std::byte* input_begin = sink_->stable_begin();
    const std::byte* input_end = sink_->stable_end();
    sink_->set_stable_range(out.get(), out.get() + d.items.size() * cs_);
    for (size_t i = 0; i < d.items.size(); ++i)
        cluster_ready(d.items[i].guest_cluster, std::span<const std::byte>(out.get() + i * cs_, cs_));
    sink_->keep_until_written(std::move(out));
    sink_->set_stable_range(input_begin, input_end);
}

std::span<const std::byte> Decoder::compose(uint64_t c, const L2Entry& e, const std::byte* host_data) {
    uint32_t n = g_.subclusters_per_cluster();
    uint64_t scs = g_.subcluster_size();
    bool simple = true;
    for (uint32_t sc = 0; sc < n && simple; ++sc)
        simple = format::subcluster_type(e, sc, g_) == format::subcluster_type(e, 0, g_);
    auto t0 = format::subcluster_type(e, 0, g_);
    if (simple && t0 == SubclusterType::normal) return {host_data, cs_};
    if (simple && (t0 == SubclusterType::zero_plain || t0 == SubclusterType::zero_alloc ||
                   (!backing_ && (t0 == SubclusterType::unallocated_plain || t0 == SubclusterType::unallocated_alloc))))
        return zeros_;
    for (uint32_t sc = 0; sc < n; ++sc) {
        std::span<std::byte> part(compose_buf_.data() + sc * scs, scs);
        switch (format::subcluster_type(e, sc, g_)) {
            case SubclusterType::normal: std::memcpy(part.data(), host_data + sc * scs, scs); break;
            case SubclusterType::unallocated_plain:
            case SubclusterType::unallocated_alloc:
                if (backing_)
                    backing_->read(c * cs_ + sc * scs, part);
                else
                    std::memset(part.data(), 0, scs);
                break;
            default: std::memset(part.data(), 0, scs); break;
        }
    }
    return compose_buf_;
}

void Decoder::write_sparse(uint64_t c, std::span<const std::byte> data) {
    uint64_t len = guest_len(c);
    for (uint64_t at = 0; at < len; at += kSparseBlock) {
        auto part = data.subspan(at, std::min<uint64_t>(kSparseBlock, len - at));
        if (!all_zero(part)) sink_->write_at(c * cs_ + at, part);
    }
    done_ += len;
}

void Decoder::cluster_ready(uint64_t c, std::span<const std::byte> data) {
    uint64_t l1i = c / l2_entries_;
    if (sparse_) {
        write_sparse(c, data);
        if (--l2_pending_[l1i] == 0) release_table(l1i);
    } else if (c == cursor_) {
        sink_->write_at(c * cs_, data.first(guest_len(c)));
        done_ += guest_len(c);
        if (++cursor_ % l2_entries_ == 0) release_table(l1i);
        advance();
    } else {
        store_->put(kGuestKeyBit | c, data);
    }
}

void Decoder::resolved_without_data(uint64_t c, const L2Entry& e) {
    if (!sparse_) return;  // advance() writes it in order
    if (backing_)
        write_sparse(c, compose(c, e, nullptr));
    else
        done_ += guest_len(c);
}

void Decoder::resolve_unallocated(uint64_t first, uint64_t end) {
    if (!sparse_ || first >= end) return;
    if (!backing_) {
        done_ += std::min(h_.size, end * cs_) - first * cs_;
        return;
    }
    L2Entry none;
    for (uint64_t c = first; c < end; ++c) write_sparse(c, compose(c, none, nullptr));
}

void Decoder::advance() {
    if (sparse_) return;
    while (cursor_ < nclusters_ && l1_known_) {
        uint64_t l1i = cursor_ / l2_entries_;
        uint64_t table_end = std::min(nclusters_, (l1i + 1) * l2_entries_);
        if (!l1_[l1i]) {
            L2Entry none;
            if (backing_) {
                for (; cursor_ < table_end; ++cursor_) {
                    sink_->write_at(cursor_ * cs_, compose(cursor_, none, nullptr).first(guest_len(cursor_)));
                    done_ += guest_len(cursor_);
                }
            } else {
                uint64_t len = std::min(h_.size, table_end * cs_) - cursor_ * cs_;
                sink_->write_zeros(cursor_ * cs_, len);
                done_ += len;
                cursor_ = table_end;
            }
            continue;
        }
        if (l2_tables_[l1i].empty()) return;
        L2Entry e = entry(cursor_);
        bool needs_data = e.compressed;
        for (uint32_t sc = 0; sc < g_.subclusters_per_cluster() && !needs_data; ++sc)
            needs_data = format::subcluster_type(e, sc, g_) == SubclusterType::normal;
        uint64_t len = guest_len(cursor_);
        if (!needs_data) {
            auto data = compose(cursor_, e, nullptr);
            if (data.data() == zeros_.data())
                sink_->write_zeros(cursor_ * cs_, len);
            else
                sink_->write_at(cursor_ * cs_, data.first(len));
        } else if (store_->contains(kGuestKeyBit | cursor_)) {
            store_->take(kGuestKeyBit | cursor_, take_buf_);
            sink_->write_at(cursor_ * cs_, std::span(take_buf_).first(len));
        } else {
            return;  // its data has not arrived yet
        }
        done_ += len;
        if (++cursor_ == table_end) release_table(l1i);
    }
}

void Decoder::finish() {
    submit_batch();
    pool_->drain([this](Batch& b) { on_batch_done(b); });
    if (!l1_known_)
        bad("the stream ends at offset " + hex(pos_) + " before the L1 table at " + hex(l1_offset_) + " (" +
            std::to_string(l1_len_) + " bytes)");
    if (!l2_wanted_.empty()) {
        auto it = std::min_element(l2_wanted_.begin(), l2_wanted_.end());
        bad("L2 table at offset " + hex(it->first) + " (L1 index " + std::to_string(it->second) +
            ") lies past the end of the stream at " + hex(pos_));
    }
    for (auto& [host, v] : data_wanted_) {
        if (!(v & kGuestKeyBit)) continue;  // preallocated zero cluster: nothing to read
        bad("data cluster at offset " + hex(host) + " (guest offset " + hex((v & ~kGuestKeyBit) * cs_) +
            ") lies past the end of the stream at " + hex(pos_));
    }
    if (!compressed_wanted_.empty()) {
        auto& [start, w] = *compressed_wanted_.begin();
        bad("compressed cluster at offset " + hex(start) + " (guest offset " + hex(w.guest_cluster * cs_) +
            ") lies past the end of the stream at " + hex(pos_));
    }
    advance();
    if (!sparse_ && cursor_ < nclusters_)
        fail(EIO, "internal error: guest cluster " + std::to_string(cursor_) + " unresolved at the end");
    sink_->sync();
    stats_.stream_bytes = pos_;
    progress_.finish(done_, "read " + human_bytes(static_cast<double>(pos_)));
}

void Decoder::read_stream() {
    size_t chunk = std::max<size_t>(kReadChunk, cs_);
    uint64_t host = cs_;
    bool eof = pos_ < cs_;  // the stream ended inside cluster 0
    for (size_t k = 0; !eof; k = (k + 1) % inputs_.size()) {
        InputBuffer& buf = inputs_[k];
        sink_->wait_written(buf.written_ticket);  // the sink no longer points into it
        buf.bytes.resize(chunk);
        size_t n = read_full(in_, buf.bytes, "the input");
        eof = n < chunk;
        sink_->set_stable_range(buf.bytes.data(), buf.bytes.data() + n);
        for (size_t at = 0; at < n; at += cs_) {
            size_t valid = std::min<size_t>(cs_, n - at);
            std::span<std::byte> cl(buf.bytes.data() + at, cs_);
            if (valid < cs_) std::memset(cl.data() + valid, 0, cs_ - valid);
            on_host_cluster(host, cl, valid);
            host += cs_;
        }
        submit_batch();
        pool_->poll([this](Batch& b) { on_batch_done(b); });
        buf.written_ticket = sink_->flush();
        report_progress();
    }
}

DecodeStats Decoder::run() {
    read_header();
    sparse_ = positioned_ && o_.sparse.value_or(true);
    if (positioned_) {
        // A regular file gets the virtual size (and holes where nothing is written); a device
        // must be large enough.
        if (fd_kind(out_fd_) == FdKind::regular) {
            if (::ftruncate(out_fd_, static_cast<off_t>(h_.size)) != 0)
                fail(errno, "cannot set the output's size to " + std::to_string(h_.size) + " bytes");
        } else if (fd_size(out_fd_) < h_.size) {
            fail(ENOSPC, "the output device (" + std::to_string(fd_size(out_fd_)) +
                             " bytes) is smaller than the virtual disk (" + std::to_string(h_.size) + " bytes)");
        }
    }
    store_ = std::make_unique<RetainedStore>(cs_, o_.memory, o_.spill_dir.empty() ? default_temp_dir() : o_.spill_dir);
    unsigned threads = o_.threads ? o_.threads : default_threads();
    pool_ = std::make_unique<OrderedPool>(threads, threads * 4);
    // A file or device is written from the reading thread, while the bytes are still in its cache;
    // a pipe may block on its reader, so a thread of the sink's own writes to it.
    sink_ = std::make_unique<RawSink>(out_fd_, positioned_, !positioned_);
    compose_buf_.resize(cs_);
    take_buf_.resize(cs_);
    zeros_.assign(cs_, std::byte{0});
    if (l1_len_ == 0) {
        l1_known_ = true;
        check_mapping_complete();
    }

    read_stream();
    finish();
    stats_.peak_spill = store_->spill_file_bytes();
    stats_.peak_memory = store_->peak_memory_bytes();
    return stats_;
}

DecodeStats BackingSource::decode_with_depth(int in, int out, const DecodeOptions& o, const std::string& path,
                                             int depth) {
    if (fd_kind(out) == FdKind::regular && ::ftruncate(out, 0) != 0) fail(errno, "cannot truncate the output");
    Decoder d(in, out, true, o, path, depth);
    return d.run();
}

}  // namespace

DecodeStats decode(int in_fd, int out_fd, bool out_positioned, const DecodeOptions& options) {
    grow_pipe(in_fd, kInputPipeBytes);
    Decoder d(in_fd, out_fd, out_positioned, options, {}, 0);
    return d.run();
}

}  // namespace qcowfs::stream
