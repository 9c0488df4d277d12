// Refcount rebuild: count every reference to every host cluster, then write a new self-describing refcount structure.
#include "qcowfs/qcow2/rebuild.hpp"

#include <algorithm>
#include <map>
#include <string>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/bitmaps.hpp"

namespace qcowfs::qcow2 {

namespace {

uint64_t div_ceil(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

/// Bytes read or written per I/O when walking large tables or writing the new blocks.
constexpr uint64_t kChunkBytes = 1 << 20;

/// Reads exactly buf.size() bytes at `offset`, EIO naming `what` when the file ends first.
Task<void> read_exact(io::File& file, uint64_t offset, std::span<std::byte> buf, const std::string& what) {
    const size_t n = co_await file.read_at(offset, buf);
    if (n != buf.size())
        corrupt(what + " at " + hex(offset) + " (" + std::to_string(buf.size()) + " bytes) is cut off by the end of " +
                file.name());
}

/// The references counted so far: one counter per host cluster of the file.
class ReferenceCounts {
public:
    ReferenceCounts(io::File& file, uint32_t cluster_bits)
        : file_(file), cluster_bits_(cluster_bits), counts_(div_ceil(file.size(), uint64_t{1} << cluster_bits)) {
        if (counts_.empty()) corrupt(file.name() + " is empty");
        counts_[0] = 1;  // the header cluster
    }

    /// Adds `times` references to every cluster that [offset, offset + bytes) touches. EIO naming
    /// `what` if a cluster is 0 (the header) or starts at or beyond the end of the file.
    void add(uint64_t offset, uint64_t bytes, uint64_t times, const std::string& what) {
        if (bytes == 0) return;
        const uint64_t first = offset >> cluster_bits_, last = (offset + bytes - 1) >> cluster_bits_;
        if (first == 0) corrupt(what + " at " + hex(offset) + " lies in cluster 0, the header");
        if (last >= counts_.size() || offset + bytes < offset)
            corrupt(what + " at " + hex(offset) + " (" + std::to_string(bytes) + " bytes) lies beyond the end of " +
                    file_.name() + " (" + std::to_string(file_.size()) + " bytes)");
        for (uint64_t c = first; c <= last; ++c) counts_[c] += times;
    }

    std::vector<uint64_t>& counts() { return counts_; }

private:
    io::File& file_;
    uint32_t cluster_bits_;
    std::vector<uint64_t> counts_;
};

/// Counts an L1 table and notes, per L2 table, how many L1 entries point at it.
Task<void> count_l1(io::File& file, ReferenceCounts& refs, std::map<uint64_t, uint64_t>& l2_tables,
                    uint64_t l1_offset, uint32_t l1_size, uint32_t cluster_bits, const std::string& what) {
    const uint64_t bytes = uint64_t{l1_size} * 8;
    refs.add(l1_offset, bytes, 1, what);
    std::vector<std::byte> raw(std::min(bytes, kChunkBytes));
    for (uint64_t done = 0; done < bytes; done += raw.size()) {
        std::span<std::byte> part(raw.data(), std::min<uint64_t>(raw.size(), bytes - done));
        co_await read_exact(file, l1_offset + done, part, what);
        for (size_t k = 0; k < part.size() / 8; ++k) {
            format::L1Entry e;
            try {
                e = format::decode_l1(format::load_be64(part.data() + 8 * k), cluster_bits);
            } catch (const std::system_error& x) {
                corrupt(what + " entry " + std::to_string((done + 8 * k) / 8) + ": " + reason_of(x));
            }
            if (e.l2_offset != 0) ++l2_tables[e.l2_offset];
        }
    }
}

/// Counts each L2 table once per L1 entry pointing at it, and its data clusters as many times.
Task<void> count_l2_tables(io::File& file, ReferenceCounts& refs, const std::map<uint64_t, uint64_t>& l2_tables,
                           const format::Header& h) {
    const ClusterGeometry g = h.geometry();
    const bool external = h.has_external_data_file();
    std::vector<std::byte> table(g.cluster_size());
    for (auto [offset, times] : l2_tables) {
        const std::string what = "L2 table " + hex(offset);
        refs.add(offset, g.cluster_size(), times, what);
        co_await read_exact(file, offset, table, what);
        for (uint64_t i = 0; i < g.l2_entries(); ++i) {
            const std::byte* p = table.data() + i * g.l2_entry_size();
            format::L2Entry e;
            try {
                e = format::decode_l2(format::load_be64(p), g.extended_l2 ? format::load_be64(p + 8) : 0, g, h.version,
                                      external);
            } catch (const std::system_error& x) {
                corrupt(what + " entry " + std::to_string(i) + ": " + reason_of(x));
            }
            if (e.compressed)
                refs.add(e.host_offset, e.compressed_size, times,
                         what + " entry " + std::to_string(i) + ": compressed cluster");
            else if (e.host_offset != 0 && !external)
                refs.add(e.host_offset, g.cluster_size(), times, what + " entry " + std::to_string(i) + ": data cluster");
        }
    }
}

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

Task<std::vector<uint64_t>> count_references(io::File& file, const format::ImageMetadata& meta,
                                             const std::vector<format::Snapshot>& snapshots) {
    const format::Header& h = meta.header;
    const uint32_t bits = h.cluster_bits;
    const uint64_t cs = h.cluster_size();
    if (snapshots.size() != h.nb_snapshots)
        fail(EINVAL, std::to_string(snapshots.size()) + " snapshots given for an image with " +
                         std::to_string(h.nb_snapshots));
    ReferenceCounts refs(file, bits);
    std::map<uint64_t, uint64_t> l2_tables;  // L2 table offset -> L1 entries pointing at it
    co_await count_l1(file, refs, l2_tables, h.l1_table_offset, h.l1_size, bits, "active L1 table");
    if (h.nb_snapshots != 0) {
        refs.add(h.snapshots_offset, format::serialize_snapshot_table(snapshots, h.version).size(), 1,
                 "snapshot table");
        for (const auto& s : snapshots)
            co_await count_l1(file, refs, l2_tables, s.l1_table_offset, s.l1_size, bits,
                              "L1 table of snapshot '" + s.name + "' (ID " + s.id + ")");
    }
    co_await count_l2_tables(file, refs, l2_tables, h);
    for (uint64_t offset : co_await bitmap_clusters(file, meta)) refs.add(offset, cs, 1, "bitmap cluster");
    for (const auto& x : meta.extensions.unknown)
        if (x.type == format::kExtCrypto && x.data.size() >= 16)
            refs.add(format::load_be64(x.data.data()), format::load_be64(x.data.data() + 8), 1, "encryption header");

    co_return std::move(refs.counts());
}

Task<RebuildResult> rebuild_refcounts(io::File& file, const format::ImageMetadata& meta,
                                      const std::vector<format::Snapshot>& snapshots,
                                      std::function<Task<void>(uint64_t, uint32_t)> point_header_at) {
    const format::Header& h = meta.header;
    const uint32_t bits = h.cluster_bits;
    const uint64_t cs = h.cluster_size();

    // 1. Count every reference.
    std::vector<uint64_t> counts = co_await count_references(file, meta, snapshots);
    const uint64_t max = format::max_refcount(h.refcount_order);
    uint64_t last_used = 0;
    for (uint64_t c = 0; c < counts.size(); ++c) {
        if (counts[c] == 0) continue;
        if (counts[c] > max)
            corrupt("cluster " + std::to_string(c) + " (host offset " + hex(c << bits) + ") has " +
                    std::to_string(counts[c]) + " references, more than a " + std::to_string(1u << h.refcount_order) +
                    "-bit refcount holds");
        last_used = c;
    }

    // 2. Layout, as Refcounts::grow_table does it: nb blocks then the table (tc clusters), from the
    // first cluster after everything in use and the old structure; the blocks describe
    // themselves and the table. Only ranges with a cluster in use get a block.
    const uint64_t per_block = format::refcount_block_entries(bits, h.refcount_order);
    const uint64_t start = std::max(last_used + 1, co_await end_of_old_structure(file, h));
    std::vector<uint64_t> ranges;  // refcount table indexes that get a block, ascending
    for (uint64_t c = 0; c < counts.size(); ++c)
        if (counts[c] != 0 && (ranges.empty() || ranges.back() != c / per_block)) ranges.push_back(c / per_block);
    const size_t used_ranges = ranges.size();
    uint64_t nb = 1, tc = 1;
    for (;;) {
        ranges.resize(used_ranges);
        for (uint64_t r = start / per_block; r <= (start + nb + tc - 1) / per_block; ++r)
            if (ranges.empty() || ranges.back() < r) ranges.push_back(r);
        uint64_t new_nb = ranges.size(), new_tc = div_ceil((ranges.back() + 1) * 8, cs);
        if (new_nb == nb && new_tc == tc) break;
        nb = new_nb;
        tc = new_tc;
    }
    if (tc * cs > format::kMaxRefcountTableBytes)
        fail(ENOSPC, "the rebuilt refcount table of " + std::to_string(tc) + " clusters would exceed the 8 MiB limit");
    counts.resize(start + nb + tc, 0);
    for (uint64_t c = start; c < start + nb + tc; ++c) counts[c] = 1;
    const uint64_t table_offset = (start + nb) << bits;

    // 3. Blocks, in batches of contiguous clusters, then the table; sync.
    std::vector<uint64_t> table(tc * cs / 8, 0);
    const uint64_t batch_blocks = std::max<uint64_t>(1, kChunkBytes / cs);
    std::vector<std::byte> batch;
    for (uint64_t k = 0; k < nb; k += batch_blocks) {
        const uint64_t n = std::min(batch_blocks, nb - k);
        batch.assign(n * cs, std::byte{0});
        for (uint64_t j = 0; j < n; ++j) {
            const uint64_t r = ranges[k + j];
            table[r] = (start + k + j) << bits;
            std::span<std::byte> block(batch.data() + j * cs, cs);
            const uint64_t end = std::min<uint64_t>(counts.size(), (r + 1) * per_block);
            for (uint64_t c = r * per_block; c < end; ++c)
                if (counts[c] != 0) format::set_refcount(block, h.refcount_order, c - r * per_block, counts[c]);
        }
        co_await file.write_at((start + k) << bits, batch);
    }
    batch.assign(tc * cs, std::byte{0});
    for (size_t i = 0; i < table.size(); ++i) format::store_be64(batch.data() + 8 * i, table[i]);
    co_await file.write_at(table_offset, batch);
    co_await file.flush();

    // 4. The header moves to the new structure; the old one is free from then on.
    co_await point_header_at(table_offset, static_cast<uint32_t>(tc));

    RebuildResult result;
    result.table_offset = table_offset;
    result.table_clusters = static_cast<uint32_t>(tc);
    result.clusters_in_use = static_cast<uint64_t>(std::count_if(counts.begin(), counts.end(), [](uint64_t v) { return v != 0; }));
    co_return result;
}

}  // namespace qcowfs::qcow2
