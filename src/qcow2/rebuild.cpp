// Refcount rebuild: count every reference to every host cluster, then write a new self-describing refcount structure.
#include "qcowfs/qcow2/rebuild.hpp"

#include <algorithm>
#include <concepts>
#include <optional>
#include <string>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/format/refcount_layout.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/bitmaps.hpp"

namespace qcowfs::qcow2 {

namespace {

/// Bytes read or written per I/O when walking large tables or writing the new blocks.
constexpr uint64_t kChunkBytes = 1 << 20;

/// Reads exactly buf.size() bytes at `offset`, EIO naming `what` when the file ends first.
Task<void> read_exact(io::File& file, uint64_t offset, std::span<std::byte> buf, const std::string& what) {
    const size_t n = co_await file.read_at(offset, buf);
    if (n != buf.size())
        corrupt(what + " at " + hex(offset) + " (" + std::to_string(buf.size()) + " bytes) is cut off by the end of " +
                file.name());
}

/// One pass over every reference of the image, counting those that fall in one window of host
/// clusters [lo, lo + counts.size()); the walk itself checks every reference (first pass).
class ReferenceWalk {
public:
    ReferenceWalk(io::File& file, const format::ImageMetadata& meta, const std::vector<format::Snapshot>& snapshots,
                  const ScanLimits& limits, uint64_t& scanned)
        : file_(file), meta_(meta), snapshots_(snapshots), limits_(limits), scanned_(scanned),
          cluster_bits_(meta.header.cluster_bits), file_clusters_(div_ceil(file.size(), meta.header.cluster_size())) {
        if (file_clusters_ == 0) corrupt(file.name() + " is empty");
    }

    /// Counts into `counts` (cleared first) the references to clusters [lo, lo + counts.size()).
    Task<void> run(uint64_t lo, std::vector<uint64_t>& counts) {
        lo_ = lo;
        counts_ = &counts;
        std::fill(counts.begin(), counts.end(), 0);
        const format::Header& h = meta_.header;
        if (lo == 0 && !counts.empty()) counts[0] = 1;  // the header cluster
        co_await walk_l1(h.l1_table_offset, h.l1_size, "active L1 table");
        if (h.nb_snapshots != 0) {
            add(h.snapshots_offset, format::serialize_snapshot_table(snapshots_, h.version).size(), 1, "snapshot table");
            for (const auto& s : snapshots_)
                co_await walk_l1(s.l1_table_offset, s.l1_size, "L1 table of snapshot '" + s.name + "' (ID " + s.id + ")");
        }
        if (!bitmaps_) bitmaps_ = co_await bitmap_clusters(file_, meta_);
        for (uint64_t offset : *bitmaps_) add(offset, meta_.header.cluster_size(), 1, "bitmap cluster");
        for (const auto& x : meta_.extensions.unknown)
            if (x.type == format::kExtCrypto && x.data.size() >= 16)
                add(format::load_be64(x.data.data()), format::load_be64(x.data.data() + 8), 1, "encryption header");
    }

    uint64_t last_referenced() const { return last_; }

private:
    /// `bytes` of metadata are about to be read: ECANCELED past the limit.
    void charge(uint64_t bytes) {
        scanned_ += std::max<uint64_t>(bytes, 4096);
        if (scanned_ > limits_.scan_bytes)
            fail(ECANCELED, "counting references would read more than " + std::to_string(limits_.scan_bytes) +
                                " bytes of metadata (-o scan_limit)");
    }

    /// Adds `times` references to every cluster that [offset, offset + bytes) touches. EIO naming
    /// `what` if a cluster is 0 (the header) or starts at or beyond the end of the file.
    void add(uint64_t offset, uint64_t bytes, uint64_t times, const std::string& what) {
        add(offset, bytes, times, [&] { return what; });
    }
    /// The same, with the name made by `name()` only for an error: a walk adds every data
    /// cluster of the image, and building a string for each cost three allocations.
    template <std::invocable Name>
    void add(uint64_t offset, uint64_t bytes, uint64_t times, const Name& name) {
        if (bytes == 0) return;
        const uint64_t first = offset >> cluster_bits_, last = (offset + bytes - 1) >> cluster_bits_;
        if (first == 0) corrupt(name() + " at " + hex(offset) + " lies in cluster 0, the header");
        if (last >= file_clusters_ || offset + bytes < offset)
            corrupt(name() + " at " + hex(offset) + " (" + std::to_string(bytes) + " bytes) lies beyond the end of " +
                    file_.name() + " (" + std::to_string(file_.size()) + " bytes)");
        last_ = std::max(last_, last);
        const uint64_t hi = lo_ + counts_->size();
        for (uint64_t c = std::max(first, lo_); c <= last && c < hi; ++c) (*counts_)[c - lo_] += times;
    }

    /// Counts an L1 table, each L2 table once per L1 entry pointing at it and the L2 table's data
    /// clusters as many times. 1 MiB of the L1 table at a time; L2 tables named more than once in
    /// it are read once.
    Task<void> walk_l1(uint64_t l1_offset, uint32_t l1_size, const std::string& what) {
        const uint64_t bytes = uint64_t{l1_size} * 8;
        add(l1_offset, bytes, 1, what);
        std::vector<std::byte> raw(std::min(bytes, kChunkBytes));
        std::vector<uint64_t> tables;
        for (uint64_t done = 0; done < bytes; done += raw.size()) {
            std::span<std::byte> part(raw.data(), std::min<uint64_t>(raw.size(), bytes - done));
            charge(part.size());
            co_await read_exact(file_, l1_offset + done, part, what);
            tables.clear();
            for (size_t k = 0; k < part.size() / 8; ++k) {
                format::L1Entry e;
                try {
                    e = format::decode_l1(format::load_be64(part.data() + 8 * k), cluster_bits_);
                } catch (const std::system_error& x) {
                    corrupt(what + " entry " + std::to_string((done + 8 * k) / 8) + ": " + reason_of(x));
                }
                if (e.l2_offset != 0) tables.push_back(e.l2_offset);
            }
            std::sort(tables.begin(), tables.end());
            for (size_t i = 0; i < tables.size();) {
                size_t j = i;
                while (j < tables.size() && tables[j] == tables[i]) ++j;
                co_await walk_l2(tables[i], j - i);
                i = j;
            }
        }
    }

    Task<void> walk_l2(uint64_t offset, uint64_t times) {
        const format::Header& h = meta_.header;
        const ClusterGeometry g = h.geometry();
        const bool external = h.has_external_data_file();
        const std::string what = "L2 table " + hex(offset);
        add(offset, g.cluster_size(), times, what);
        table_.resize(g.cluster_size());
        charge(table_.size());
        co_await read_exact(file_, offset, table_, what);
        for (uint64_t i = 0; i < g.l2_entries(); ++i) {
            const std::byte* p = table_.data() + i * g.l2_entry_size();
            format::L2Entry e;
            try {
                e = format::decode_l2(format::load_be64(p), g.extended_l2 ? format::load_be64(p + 8) : 0, g, h.version,
                                      external);
            } catch (const std::system_error& x) {
                corrupt(what + " entry " + std::to_string(i) + ": " + reason_of(x));
            }
            if (e.compressed)
                add(e.host_offset, e.compressed_size, times,
                    [&] { return what + " entry " + std::to_string(i) + ": compressed cluster"; });
            else if (e.host_offset != 0 && !external)
                add(e.host_offset, g.cluster_size(), times,
                    [&] { return what + " entry " + std::to_string(i) + ": data cluster"; });
        }
    }

    io::File& file_;
    const format::ImageMetadata& meta_;
    const std::vector<format::Snapshot>& snapshots_;
    const ScanLimits& limits_;
    uint64_t& scanned_;
    const uint32_t cluster_bits_;
    const uint64_t file_clusters_;
    uint64_t lo_ = 0;
    std::vector<uint64_t>* counts_ = nullptr;
    uint64_t last_ = 0;
    std::vector<std::byte> table_;
    std::optional<std::vector<uint64_t>> bitmaps_;
};

/// First cluster after the old refcount table and every old refcount block inside the file: the
/// new structure goes at or beyond it, so the old one stays intact until the header moves.
Task<uint64_t> end_of_old_structure(io::File& file, const format::Header& h) {
    const uint64_t cs = h.cluster_size(), file_size = file.size();
    const uint64_t offset = h.refcount_table_offset;
    if (offset >= file_size) co_return 0;
    const uint64_t bytes = std::min<uint64_t>(uint64_t{h.refcount_table_clusters} * cs, file_size - offset);
    uint64_t end = div_ceil(offset + bytes, cs);
    std::vector<std::byte> raw(std::min(bytes, kChunkBytes));
    for (uint64_t done = 0; done < bytes; done += raw.size()) {
        std::span<std::byte> part(raw.data(), std::min<uint64_t>(raw.size(), bytes - done));
        const size_t n = co_await file.read_at(offset + done, part);
        for (size_t k = 0; k < n / 8; ++k) {
            uint64_t block = format::load_be64(part.data() + 8 * k) & format::kRefcountTableOffsetMask;
            if (block != 0 && block < file_size) end = std::max(end, div_ceil(block + cs, cs));
        }
        if (n < part.size()) break;  // the file ended
    }
    co_return end;
}

}  // namespace

Task<uint64_t> count_references(io::File& file, const format::ImageMetadata& meta,
                                const std::vector<format::Snapshot>& snapshots, const ScanLimits& limits,
                                uint64_t align,
                                const std::function<Task<void>(uint64_t first, std::vector<uint64_t>& counts, bool last)>& window) {
    const format::Header& h = meta.header;
    if (snapshots.size() != h.nb_snapshots)
        fail(EINVAL, std::to_string(snapshots.size()) + " snapshots given for an image with " +
                         std::to_string(h.nb_snapshots));
    align = std::max<uint64_t>(align, 1);
    const uint64_t file_clusters = div_ceil(file.size(), h.cluster_size());
    uint64_t width = std::max<uint64_t>(align, limits.counter_bytes / 8 / align * align);
    uint64_t scanned = 0;
    ReferenceWalk walk(file, meta, snapshots, limits, scanned);
    std::vector<uint64_t> counts(std::min(width, std::max<uint64_t>(file_clusters, 1)));
    // The first pass also finds the last referenced cluster, which bounds the other passes.
    co_await walk.run(0, counts);
    const uint64_t last = walk.last_referenced();
    counts.resize(std::min<uint64_t>(counts.size(), last + 1));
    co_await window(0, counts, last < width);
    for (uint64_t lo = width; lo <= last; lo += width) {
        counts.assign(std::min(width, last + 1 - lo), 0);
        co_await walk.run(lo, counts);
        co_await window(lo, counts, last - lo < width);
    }
    co_return last;
}

namespace {

/// One refcount rebuild, step by step (rebuild_refcounts() below runs them in order).
class Rebuild {
public:
    Rebuild(io::File& file, const format::ImageMetadata& meta, const std::vector<format::Snapshot>& snapshots,
            const ScanLimits& limits)
        : file_(file), meta_(meta), snapshots_(snapshots), h_(meta.header), bits_(h_.cluster_bits), cs_(h_.cluster_size()),
          per_block_(format::refcount_block_entries(bits_, h_.refcount_order)),
          // Counting twice (several windows) reads the metadata twice: each count gets half the
          // limit, so that the second, which runs while blocks are written, cannot be cut short.
          half_{limits.counter_bytes, limits.scan_bytes / 2} {}

    /// 1. Counts every reference, window by window (windows hold whole refcount blocks): finds
    /// the last used cluster and the refcount blocks that describe a used cluster. With one
    /// window the counts are kept for step 3; with more, step 3 counts again.
    Task<void> survey() {
        const uint64_t max = format::max_refcount(h_.refcount_order);
        auto window = [&](uint64_t lo, std::vector<uint64_t>& counts, bool last) -> Task<void> {
            ++windows_;
            for (uint64_t i = 0; i < counts.size(); ++i) {
                if (counts[i] == 0) continue;
                const uint64_t c = lo + i;
                if (counts[i] > max)
                    corrupt("cluster " + std::to_string(c) + " (host offset " + hex(c << bits_) + ") has " +
                            std::to_string(counts[i]) + " references, more than a " +
                            std::to_string(1u << h_.refcount_order) + "-bit refcount holds");
                last_used_ = c;
                if (ranges_.empty() || ranges_.back() != c / per_block_) ranges_.push_back(c / per_block_);
            }
            if (lo == 0 && last) kept_.swap(counts);  // the only window: no second count needed
            co_return;
        };
        co_await count_references(file_, meta_, snapshots_, half_, per_block_, window);
    }

    /// 2. Layout, as Refcounts::grow_table does it: the new blocks then the table, from the first
    /// cluster after everything in use and the old structure; the blocks describe themselves
    /// and the table. Only ranges with a cluster in use get a block.
    Task<void> lay_out() {
        start_ = std::max(last_used_ + 1, co_await end_of_old_structure(file_, h_));
        const uint64_t first_own = start_ / per_block_;
        const uint64_t below = static_cast<uint64_t>(
            std::lower_bound(ranges_.begin(), ranges_.end(), first_own) - ranges_.begin());
        layout_ = format::refcount_layout(start_, below, 0, bits_, per_block_);
        ranges_.resize(below);
        for (uint64_t r = first_own; r <= layout_.last_range; ++r) ranges_.push_back(r);
        if (layout_.table_clusters * cs_ > format::kMaxRefcountTableBytes)
            fail(ENOSPC, "the rebuilt refcount table of " + std::to_string(layout_.table_clusters) +
                             " clusters would exceed the 8 MiB limit");
    }

    /// 3. Blocks, in batches of contiguous clusters, window by window, then the table; sync.
    Task<void> write_structure() {
        if (windows_ <= 1) {
            co_await write_blocks(0, kept_, UINT64_MAX);
        } else {
            auto fill = [&](uint64_t lo, std::vector<uint64_t>& counts, bool) -> Task<void> {
                co_await write_blocks(lo, counts, div_ceil(lo + counts.size(), per_block_));
            };
            co_await count_references(file_, meta_, snapshots_, half_, per_block_, fill);
            co_await write_blocks(0, {}, UINT64_MAX);  // the blocks past the last used cluster
        }
        std::vector<uint64_t> table(layout_.table_clusters * cs_ / 8, 0);
        for (uint64_t k = 0; k < layout_.blocks; ++k) table[ranges_[k]] = (start_ + k) << bits_;
        batch_.assign(layout_.table_clusters * cs_, std::byte{0});
        for (size_t i = 0; i < table.size(); ++i) format::store_be64(batch_.data() + 8 * i, table[i]);
        co_await file_.write_at(table_offset(), batch_);
        co_await file_.flush();
    }

    uint64_t table_offset() const { return (start_ + layout_.blocks) << bits_; }
    RebuildResult result() const {
        return RebuildResult{table_offset(), static_cast<uint32_t>(layout_.table_clusters), clusters_in_use_};
    }

private:
    /// Writes the blocks of ranges below `limit`, their counts from `counts` (clusters from `lo`).
    Task<void> write_blocks(uint64_t lo, const std::vector<uint64_t>& counts, uint64_t limit) {
        const uint64_t batch_blocks = std::max<uint64_t>(1, kChunkBytes / cs_);
        const uint64_t new_end = start_ + layout_.blocks + layout_.table_clusters;  // refcount 1 each
        while (next_ < ranges_.size() && ranges_[next_] < limit) {
            uint64_t n = 0;
            while (next_ + n < ranges_.size() && ranges_[next_ + n] < limit && n < batch_blocks) ++n;
            batch_.assign(n * cs_, std::byte{0});
            for (uint64_t j = 0; j < n; ++j) {
                const uint64_t r = ranges_[next_ + j];
                std::span<std::byte> block(batch_.data() + j * cs_, cs_);
                for (uint64_t c = r * per_block_; c < (r + 1) * per_block_; ++c) {
                    uint64_t v = c >= start_ && c < new_end ? 1 : 0;
                    if (c >= lo && c - lo < counts.size()) v += counts[c - lo];
                    if (v == 0) continue;
                    format::set_refcount(block, h_.refcount_order, c - r * per_block_, v);
                    ++clusters_in_use_;
                }
            }
            co_await file_.write_at((start_ + next_) << bits_, batch_);
            next_ += n;
        }
    }

    io::File& file_;
    const format::ImageMetadata& meta_;
    const std::vector<format::Snapshot>& snapshots_;
    const format::Header& h_;
    const uint32_t bits_;
    const uint64_t cs_;
    const uint64_t per_block_;
    const ScanLimits half_;
    uint64_t last_used_ = 0, windows_ = 0;
    std::vector<uint64_t> ranges_;  // refcount table indexes that get a block, ascending
    std::vector<uint64_t> kept_;    // the counts of the only window
    uint64_t start_ = 0;            // first cluster of the new structure
    format::RefcountLayout layout_;
    std::vector<std::byte> batch_;
    uint64_t clusters_in_use_ = 0;
    size_t next_ = 0;  // index into ranges_ of the next block to write
};

}  // namespace

Task<RebuildResult> rebuild_refcounts(io::File& file, const format::ImageMetadata& meta,
                                      const std::vector<format::Snapshot>& snapshots,
                                      std::function<Task<void>(uint64_t, uint32_t)> point_header_at,
                                      const ScanLimits& limits) {
    Rebuild rebuild(file, meta, snapshots, limits);
    co_await rebuild.survey();
    co_await rebuild.lay_out();
    co_await rebuild.write_structure();
    // 4. The header moves to the new structure; the old one is free from then on.
    RebuildResult result = rebuild.result();
    co_await point_header_at(result.table_offset, result.table_clusters);
    co_return result;
}

}  // namespace qcowfs::qcow2
