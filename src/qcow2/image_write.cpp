// The write path of an Image: allocation, copy-on-write, zeroing, resize and ordered flushes.
//
// A write runs in three phases per L2 table it touches (docs/architecture.md, "Writing"):
//   plan  (meta_mutex_): make the L2 table ours, decide per cluster in place / new cluster,
//                        allocate the new clusters (one contiguous run when possible);
//   data  (no lock):     read the old content the write does not cover, write old + new data;
//   link  (meta_mutex_): point the L2 entries at the data, queue the old clusters for release.
// The guest range is held exclusively (whole clusters) throughout, so no other request sees or
// changes these clusters in between. Nothing reaches the disk's metadata until flush_locked().
#include <algorithm>
#include <bit>
#include <cstring>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/qcow2/bitmaps.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "qcowfs/qcow2/rebuild.hpp"

namespace qcowfs::qcow2 {

namespace {

constexpr uint64_t kZeroBitsAll = 0xffffffff00000000ULL;
constexpr uint64_t kAllocBitsAll = 0x00000000ffffffffULL;

bool has_host(const format::L2Entry& e) { return !e.compressed && (e.host_offset != 0 || e.copied); }

/// Bits [first, last] of a 32-bit subcluster mask.
uint64_t subcluster_mask(uint32_t first, uint32_t last) {
    uint64_t upto = last >= 31 ? kAllocBitsAll : (uint64_t{1} << (last + 1)) - 1;
    return upto & ~((uint64_t{1} << first) - 1);
}

}  // namespace

/// One guest cluster of a write: the decision made in plan_cluster and carried out after.
struct Image::ClusterWrite {
    uint64_t guest_cluster = 0;  // guest cluster index
    uint64_t l2_index = 0;       // entry index in its L2 table
    uint64_t from = 0, to = 0;   // bytes of the cluster the write covers, [from, to)
    bool needs_new = false;      // data goes to a newly allocated cluster
    uint64_t host = 0;           // destination host cluster offset
    uint64_t window_from = 0, window_to = 0;  // bytes written to the host cluster (old + new)
    uint64_t old_raw = 0, old_bitmap = 0;  // the entry as planned over (unchanged: not rewritten)
    uint64_t new_bitmap = 0;
    uint64_t free_first = 0, free_count = 0;  // clusters released once the new entry is on disk
};

// ---- setup -------------------------------------------------------------------------------------

Task<void> Image::init_writing() {
    const auto& h = meta_.header;
    if (!options_.writable) {
        read_only_reason_ = "opened read-only";
        co_return;
    }
    if (h.corrupt()) {
        read_only_reason_ = "the image is marked corrupt (run qemu-img check -r all)";
        co_return;
    }
    refcounts_ = std::make_unique<Refcounts>(*file_, h, 1u << 20);
    try {
        co_await refcounts_->load();
    } catch (const std::system_error& e) {
        refcounts_.reset();
        read_only_reason_ = "refcount table: " + reason_of(e);
        co_return;
    }
    install_refcount_hooks();
    range_lock_ = std::make_unique<cache::RangeLock>(co_await asio::this_coro::executor);
    file_end_ = file_->size();
    const uint32_t cb = geometry_.cluster_bits;
    std::vector<uint64_t> l2_tables;
    for (uint64_t raw : l1_)
        if (uint64_t l2 = raw & format::kL1OffsetMask) l2_tables.push_back(l2 >> cb);
    metadata_map_.set_l2(std::move(l2_tables));
    std::string bad;
    try {
        for (auto& a : co_await bitmap_metadata_areas(*file_, meta_))
            bitmap_areas_.push_back({a.offset >> cb, a.bytes ? ((a.offset + a.bytes - 1) >> cb) + 1 : a.offset >> cb,
                                     kMetaBitmapTable, a.what});
        if (!bitmap_areas_.empty()) bitmap_areas_.front().kind = kMetaBitmapDirectory;
    } catch (const std::system_error& e) {
        bad = "bitmaps: " + reason_of(e);
    }
    if (bad.empty())
        if (auto overlap = refresh_metadata_map()) bad = "metadata overlaps: " + *overlap;
    if (!bad.empty()) {
        refcounts_.reset();
        read_only_reason_ = bad;
    }
}

void Image::install_refcount_hooks() {
    refcounts_->on_table_moved = [this](uint64_t offset, uint32_t clusters) -> Task<void> {
        meta_.header.refcount_table_offset = offset;
        meta_.header.refcount_table_clusters = clusters;
        co_await write_header();
    };
    // Refcounts know their own table and blocks; everything else is asked of the map.
    refcounts_->placement_check = [this](uint64_t first, uint64_t count) {
        return metadata_map_.find(first, count, 0, refcounts_.get());
    };
}

std::optional<std::string> Image::refresh_metadata_map() {
    const uint32_t cb = geometry_.cluster_bits;
    const auto& h = meta_.header;
    auto area = [&](uint64_t offset, uint64_t bytes, MetadataKind kind, std::string what) {
        return MetadataMap::Area{offset >> cb, bytes ? ((offset + bytes - 1) >> cb) + 1 : offset >> cb, kind, std::move(what)};
    };
    std::vector<MetadataMap::Area> areas = bitmap_areas_;
    areas.push_back({0, 1, kMetaHeader, "the image header"});
    areas.push_back(area(h.l1_table_offset, uint64_t{h.l1_size} * 8, kMetaActiveL1, "the L1 table"));
    if (h.nb_snapshots) {
        areas.push_back(area(h.snapshots_offset, format::serialize_snapshot_table(snapshots_, h.version).size(),
                             kMetaSnapshotTable, "the snapshot table"));
        for (const auto& s : snapshots_)
            areas.push_back(area(s.l1_table_offset, uint64_t{s.l1_size} * 8, kMetaSnapshotL1,
                                 "snapshot " + s.id + "'s L1 table"));
    }
    // Snapshots may share one L1 table: merge equal areas of that kind instead of calling them
    // overlapping.
    std::sort(areas.begin(), areas.end(), [](const auto& a, const auto& b) { return a.first < b.first || (a.first == b.first && a.end < b.end); });
    areas.erase(std::unique(areas.begin(), areas.end(), [](const auto& a, const auto& b) {
                    return a.first == b.first && a.end == b.end && a.kind == kMetaSnapshotL1 && b.kind == kMetaSnapshotL1;
                }),
                areas.end());
    if (auto overlap = metadata_map_.set_fixed(std::move(areas))) return overlap;
    // The refcount structure against the rest (Refcounts places nothing on metadata either).
    for (const auto& a : metadata_map_.fixed())
        if (a.kind != kMetaHeader && refcounts_->holds_refcount_metadata(a.first, a.end))
            return a.what + " overlaps the refcount table or a refcount block";
    return std::nullopt;
}

Task<uint64_t> Image::allocate_clusters(uint64_t count) {
    std::string problem;
    try {
        co_return co_await refcounts_->allocate(count);
    } catch (const std::system_error&) {
        problem = refcounts_->placement_problem();
        if (problem.empty()) throw;
    }
    co_await mark_corrupt(problem);
    co_return 0;
}

void Image::check_writable() const {
    if (!read_only_reason_.empty()) fail(EROFS, read_only_reason_);
}

void Image::lock_for_writing() {
    check_writable();
    if (write_locked_) return;
    file_->set_lock(io::LockMode::write);
    if (data_file_) {
        try {
            data_file_->set_lock(io::LockMode::write);
        } catch (...) {
            file_->set_lock(io::LockMode::read);
            throw;
        }
    }
    write_locked_ = true;
}

Task<void> Image::prepare_write() {
    if (prepared_) co_return;
    lock_for_writing();  // nothing is written without QEMU's write locks
    auto& h = meta_.header;
    const ScanLimits limits{options_.refcount_memory, options_.scan_limit};
    if (h.dirty()) {
        // Refcounts may be stale (a crash with lazy_refcounts): rebuild them before anything
        // allocates, as QEMU does when it opens a dirty image for writing.
        std::string too_much;
        try {
            co_await rebuild_refcounts(*file_, meta_, snapshots_,
                                       [this](uint64_t offset, uint32_t clusters) -> Task<void> {
                                           meta_.header.refcount_table_offset = offset;
                                           meta_.header.refcount_table_clusters = clusters;
                                           co_await write_header();
                                       },
                                       limits);
        } catch (const std::system_error& e) {
            if (errno_of(e) != ECANCELED) throw;
            too_much = reason_of(e);
        }
        if (!too_much.empty()) {
            // Not corrupt, only too large for the limit: later writes are refused at once.
            read_only_reason_ = "the dirty image needs a refcount rebuild, but " + too_much;
            fail(EIO, read_only_reason_);
        }
        auto fresh = std::make_unique<Refcounts>(*file_, h, 1u << 20);
        co_await fresh->load();
        refcounts_ = std::move(fresh);
        install_refcount_hooks();
        file_end_ = std::max(file_end_, file_->size());
    } else {
        // The allocator trusts refcounts: a used cluster whose refcount is too low would be handed
        // out again and overwritten. Find that before the first write, not after. Past the scan
        // limit the check is skipped: the overlap check still keeps allocations off metadata.
        std::optional<std::pair<uint64_t, uint64_t>> under;
        std::string bad;
        try {
            co_await count_references(*file_, meta_, snapshots_, limits, refcounts_->block_entries(),
                                      [&](uint64_t first, std::vector<uint64_t>& counts, bool) -> Task<void> {
                                          if (!under) under = co_await refcounts_->find_undercounted(first, counts);
                                      });
        } catch (const std::system_error& e) {
            if (errno_of(e) != ECANCELED) bad = reason_of(e);
        }
        if (!bad.empty()) co_await mark_corrupt(bad);
        if (under)
            co_await mark_corrupt("cluster at " + hex(under->first << geometry_.cluster_bits) +
                                  " is in use but its refcount is " + std::to_string(under->second));
    }
    // Active L2 tables are written in place by flushes: none may lie in other metadata (checked
    // here once, whether or not the scan above ran; later tables are checked as they are made).
    for (uint64_t c : metadata_map_.l2_tables())
        if (auto what = metadata_map_.find(c, 1, kMetaActiveL2, refcounts_.get()))
            co_await mark_corrupt("L2 table at " + hex(c << geometry_.cluster_bits) + " lies in " + *what);
    bool header_changed = false;
    if (meta_.extensions.bitmaps && (h.autoclear_features & format::kAutoclearBitmaps)) {
        // The bitmaps are not updated by qcowfs: tell QEMU they are inconsistent before the first
        // write can make them stale.
        co_await mark_bitmaps_in_use(*file_, meta_);
    }
    // Autoclear bits qcowfs keeps true: bitmaps (marked in use above), and the raw external data
    // file (data clusters stay at their guest offset, zeroing zeroes the data file too).
    uint64_t keep = format::kAutoclearBitmaps | format::kAutoclearDataFileRaw;
    if (h.autoclear_features & ~keep) {
        h.autoclear_features &= keep;
        header_changed = true;
    }
    if ((h.compatible_features & format::kCompatLazyRefcounts) && !h.dirty()) {
        h.incompatible_features |= format::kIncompatDirty;
        clear_dirty_bit_ = true;
        header_changed = true;
    } else if (h.dirty() && !(h.compatible_features & format::kCompatLazyRefcounts)) {
        h.incompatible_features &= ~format::kIncompatDirty;  // rebuilt above
        header_changed = true;
    } else if (h.dirty()) {
        clear_dirty_bit_ = true;  // rebuilt; lazy: stays set while we write, cleared on close
    }
    if (header_changed) co_await write_header();
    prepared_ = true;
}

Task<void> Image::write_header() {
    // Only the fixed fields qcowfs changes (one sector): the extensions, the backing name and its
    // offset stay exactly where the image's creator put them.
    co_await file_->write_at(0, format::serialize_fixed_header(meta_.header));
    co_await file_->flush();
}

Task<void> Image::mark_corrupt(std::string reason) {
    if (read_only_reason_.empty()) {
        read_only_reason_ = "marked corrupt: " + reason;
        meta_.header.incompatible_features |= format::kIncompatCorrupt;
        try {
            co_await write_header();
        } catch (const std::system_error&) {
            // The image stays read-only for us either way.
        }
        if (options_.on_corrupt) options_.on_corrupt(reason);
    }
    corrupt(reason);
}

Task<void> Image::check_host_cluster(uint64_t host, const std::string& what, uint32_t ignore) {
    const uint64_t c = host >> geometry_.cluster_bits;
    std::string problem;
    if (c == 0)
        problem = "points into the image header";
    else if (host >= file_end_)
        problem = "points beyond the end of the file (" + std::to_string(file_end_) + " bytes)";
    else if (auto meta = metadata_map_.find(c, 1, ignore, refcounts_.get()))
        problem = "points into " + *meta;
    if (problem.empty() && co_await refcounts_->get(c) == 0) problem = "is in use but its refcount is 0";
    if (!problem.empty()) co_await mark_corrupt(what + " at " + hex(host) + " " + problem);
}

void Image::free_later(uint64_t first_cluster, uint64_t count) {
    if (count) pending_free_.emplace_back(first_cluster, count);
}

std::pair<uint64_t, uint64_t> Image::compressed_clusters(const format::L2Entry& e) const {
    const uint32_t cb = geometry_.cluster_bits;
    uint64_t start = e.host_offset & ~uint64_t{511};
    uint64_t end = e.host_offset + e.compressed_size;
    return {start >> cb, ((end - 1) >> cb) - (start >> cb) + 1};
}

// ---- L2 entries ------------------------------------------------------------------------------

Task<std::pair<uint64_t, uint64_t>> Image::load_l2_entry(uint64_t l2_offset, uint64_t index) {
    const size_t slice_bytes = l2_cache_->slice_bytes();
    uint64_t byte = index * geometry_.l2_entry_size();
    auto slice = co_await l2_cache_->get(l2_offset + byte / slice_bytes * slice_bytes);
    const std::byte* p = slice->bytes.data() + byte % slice_bytes;
    co_return std::make_pair(format::load_be64(p), geometry_.extended_l2 ? format::load_be64(p + 8) : 0);
}

Task<void> Image::store_l2_entry(uint64_t l2_offset, uint64_t index, uint64_t raw, uint64_t bitmap) {
    const size_t slice_bytes = l2_cache_->slice_bytes();
    uint64_t byte = index * geometry_.l2_entry_size();
    auto slice = co_await l2_cache_->get_for_write(l2_offset + byte / slice_bytes * slice_bytes);
    std::byte* p = slice->bytes.data() + byte % slice_bytes;
    format::store_be64(p, raw);
    if (geometry_.extended_l2) format::store_be64(p + 8, bitmap);
}

Task<format::L2Entry> Image::decode_l2_checked(uint64_t raw, uint64_t bitmap, uint64_t guest) {
    std::string bad;
    try {
        co_return format::decode_l2(raw, bitmap, geometry_, meta_.header.version, data_file_ != nullptr);
    } catch (const std::system_error& ex) {
        bad = "L2 entry for guest offset " + hex(guest) + ": " + reason_of(ex);
    }
    co_await mark_corrupt(bad);
    co_return format::L2Entry{};
}

Task<uint64_t> Image::l2_for_write(uint64_t l1_index) {
    const uint32_t cb = geometry_.cluster_bits;
    const uint64_t cs = geometry_.cluster_size();
    const size_t slice_bytes = l2_cache_->slice_bytes();
    format::L1Entry e;
    std::string bad;
    try {
        e = format::decode_l1(l1_[l1_index], cb);
    } catch (const std::system_error& ex) {
        bad = "L1 entry " + std::to_string(l1_index) + ": " + reason_of(ex);
    }
    if (!bad.empty()) co_await mark_corrupt(bad);
    if (e.l2_offset != 0) {
        co_await check_host_cluster(e.l2_offset, "L2 table of L1 entry " + std::to_string(l1_index), kMetaActiveL2);
        if (e.copied) co_return e.l2_offset;
        if (co_await refcounts_->get(e.l2_offset >> cb) == 1) {
            // Only we use it (a snapshot that shared it is gone): just mark it ours.
            l1_[l1_index] = format::encode_l1({e.l2_offset, true});
            dirty_l1_.insert(l1_index);
            co_return e.l2_offset;
        }
    }
    // A new table: empty, or a copy of the one shared with a snapshot.
    uint64_t table = co_await allocate_clusters(1);
    file_end_ = std::max(file_end_, table + cs);
    for (uint64_t s = 0; s < cs; s += slice_bytes) {
        std::shared_ptr<const cache::Slice> old;
        if (e.l2_offset) old = co_await l2_cache_->get(e.l2_offset + s);
        auto slice = co_await l2_cache_->create(table + s);
        if (old) std::memcpy(slice->bytes.data(), old->bytes.data(), slice_bytes);
    }
    if (e.l2_offset) {
        // The copy keeps the entries (their clusters are still shared: no COPIED flags), and
        // the snapshot keeps the old table, whose refcount drops once our L1 entry is on disk.
        free_later(e.l2_offset >> cb, 1);
        metadata_map_.remove_l2(e.l2_offset >> cb);
    }
    l1_[l1_index] = format::encode_l1({table, true});
    dirty_l1_.insert(l1_index);
    metadata_map_.add_l2(table >> cb);
    co_return table;
}

// ---- write ---------------------------------------------------------------------------------

Task<void> Image::write(uint64_t offset, std::span<const std::byte> data) {
    check_writable();
    if (offset > size() || data.size() > size() - offset)
        fail(EINVAL, "write of " + std::to_string(data.size()) + " bytes at " + std::to_string(offset) +
                         " passes the end of the disk (" + std::to_string(size()) + " bytes)");
    if (data.empty()) co_return;
    {
        auto meta = co_await meta_mutex_.lock();
        check_writable();
        co_await prepare_write();
    }
    const uint64_t cs = geometry_.cluster_size();
    uint64_t first = offset / cs * cs;
    uint64_t end = (offset + data.size() + cs - 1) / cs * cs;
    auto guard = co_await range_lock_->lock(first, end - first, cache::RangeLock::Mode::exclusive);
    co_await write_locked(offset, data);
}

Task<void> Image::write_locked(uint64_t offset, std::span<const std::byte> data) {
    const ClusterGeometry& g = geometry_;
    const uint64_t table_bytes = g.cluster_size() * g.l2_entries();
    while (!data.empty()) {
        check_writable();
        uint64_t table_end = (offset / table_bytes + 1) * table_bytes;
        uint64_t n = std::min<uint64_t>(data.size(), table_end - offset);
        co_await write_in_table(offset, data.first(n));
        offset += n;
        data = data.subspan(n);
    }
}

Task<void> Image::plan_cluster(ClusterWrite& w, uint64_t l2_offset) {
    const ClusterGeometry& g = geometry_;
    const uint64_t cs = g.cluster_size();
    const uint32_t cb = g.cluster_bits;
    auto [raw, bitmap] = co_await load_l2_entry(l2_offset, w.l2_index);
    w.old_raw = raw;
    w.old_bitmap = bitmap;
    format::L2Entry e = co_await decode_l2_checked(raw, bitmap, w.guest_cluster << cb);
    const std::string what = "data cluster of guest offset " + hex(w.guest_cluster << cb);

    // Can the data go where the cluster already is?
    bool in_place = false;
    if (has_host(e)) {
        if (data_file_) {
            in_place = true;  // external data file: data clusters sit at their guest offset, no refcounts
        } else {
            co_await check_host_cluster(e.host_offset, what);
            in_place = e.copied || co_await refcounts_->get(e.host_offset >> cb) == 1;
        }
    }
    w.needs_new = !in_place && !data_file_;
    w.host = in_place ? e.host_offset : (data_file_ ? w.guest_cluster << cb : 0);
    if (!in_place && has_host(e) && !data_file_) {
        w.free_first = e.host_offset >> cb;
        w.free_count = 1;
    }
    if (e.compressed) std::tie(w.free_first, w.free_count) = compressed_clusters(e);

    if (!g.extended_l2) {
        // Without subclusters the whole cluster becomes data: in place into a data cluster only
        // the written bytes; anything else (new cluster, or a preallocated zero cluster) gets
        // the old content around the write.
        bool whole = !(in_place && !e.zero_flag);
        w.window_from = whole ? 0 : w.from;
        w.window_to = whole ? cs : w.to;
        w.new_bitmap = 0;
        co_return;
    }
    // Extended L2: only the touched subclusters become allocated; a cluster copied out of a
    // shared or compressed one keeps every subcluster the old one had allocated.
    const uint64_t ss = g.subcluster_size();
    uint32_t s0 = static_cast<uint32_t>(w.from / ss), s1 = static_cast<uint32_t>((w.to - 1) / ss);
    uint64_t touched = subcluster_mask(s0, s1);
    uint64_t alloc = e.compressed ? kAllocBitsAll : (bitmap & kAllocBitsAll);
    uint64_t zeros = e.compressed ? 0 : (bitmap >> 32);
    if (in_place) {
        w.window_from = (alloc >> s0) & 1 ? w.from : s0 * ss;
        w.window_to = (alloc >> s1) & 1 ? w.to : (s1 + 1) * ss;
        alloc |= touched;
    } else {
        uint64_t keep = has_host(e) || e.compressed ? alloc : 0;  // subclusters whose data must move
        alloc = keep | touched;
        uint32_t lo = static_cast<uint32_t>(std::countr_zero(alloc)), hi = 31 - static_cast<uint32_t>(std::countl_zero(static_cast<uint32_t>(alloc)));
        w.window_from = std::min<uint64_t>(lo * ss, w.from);
        w.window_to = std::max<uint64_t>((hi + 1) * ss, w.to);
    }
    zeros &= ~alloc;
    w.new_bitmap = (zeros << 32) | alloc;
}

Task<void> Image::write_in_table(uint64_t offset, std::span<const std::byte> data) {
    const ClusterGeometry& g = geometry_;
    const uint64_t cs = g.cluster_size();
    const uint32_t cb = g.cluster_bits;
    const uint64_t l1_index = g.l1_index(GuestOffset{offset});
    std::vector<ClusterWrite> plan;
    for (uint64_t c = offset >> cb; c <= (offset + data.size() - 1) >> cb; ++c) {
        ClusterWrite w;
        w.guest_cluster = c;
        w.l2_index = c % g.l2_entries();
        w.from = c == offset >> cb ? offset & (cs - 1) : 0;
        w.to = c == (offset + data.size() - 1) >> cb ? ((offset + data.size() - 1) & (cs - 1)) + 1 : cs;
        plan.push_back(w);
    }

    // 1. Plan and allocate.
    uint64_t l2_offset = 0, first_new = 0, allocated = 0;
    {
        auto meta = co_await meta_mutex_.lock();
        check_writable();
        l2_offset = co_await l2_for_write(l1_index);
        for (auto& w : plan) co_await plan_cluster(w, l2_offset);
        for (auto& w : plan) allocated += w.needs_new;
        if (allocated) {
            first_new = co_await allocate_clusters(allocated);
            file_end_ = std::max(file_end_, first_new + allocated * cs);
            uint64_t next = first_new;
            for (auto& w : plan)
                if (w.needs_new) w.host = next, next += cs;
        }
    }

    // 2. Data: old content around the write, then one host write per run of adjacent clusters.
    std::exception_ptr error;
    try {
        io::File& f = data_file_ ? *data_file_ : *file_;
        size_t i = 0;
        while (i < plan.size()) {
            size_t j = i + 1;
            while (j < plan.size() && plan[j - 1].window_to == cs && plan[j].window_from == 0 &&
                   plan[j].host == plan[j - 1].host + cs)
                ++j;
            uint64_t host_start = plan[i].host + plan[i].window_from;
            uint64_t host_end = plan[j - 1].host + plan[j - 1].window_to;
            bool covered = std::all_of(plan.begin() + i, plan.begin() + j, [](const ClusterWrite& w) {
                return w.window_from == w.from && w.window_to == w.to;
            });
            if (covered) {
                // Nothing old to keep around the data: it goes to the host as it came.
                uint64_t guest = (plan[i].guest_cluster << cb) + plan[i].from;
                co_await f.write_at(host_start, data.subspan(guest - offset, host_end - host_start));
                i = j;
                continue;
            }
            std::vector<std::byte> buf(host_end - host_start);
            for (size_t k = i; k < j; ++k) {
                const ClusterWrite& w = plan[k];
                std::byte* base = buf.data() + (w.host + w.window_from - host_start) - w.window_from;
                uint64_t guest = w.guest_cluster << cb;
                if (w.window_from < w.from)
                    co_await read_mapped(active_l1(), guest + w.window_from,
                                         std::span<std::byte>(base + w.window_from, w.from - w.window_from));
                if (w.to < w.window_to)
                    co_await read_mapped(active_l1(), guest + w.to, std::span<std::byte>(base + w.to, w.window_to - w.to));
                std::memcpy(base + w.from, data.data() + (guest + w.from - offset), w.to - w.from);
            }
            co_await f.write_at(host_start, buf);
            i = j;
        }
    } catch (...) {
        error = std::current_exception();
    }
    if (error) {
        // Nothing points at the new clusters yet: give them back now.
        if (allocated) {
            auto meta = co_await meta_mutex_.lock();
            try {
                co_await refcounts_->update(first_new >> cb, allocated, -1);
            } catch (const std::system_error&) {
            }
        }
        std::rethrow_exception(error);
    }

    // 3. Link: the L2 entries point at the data; the old clusters go once that is on disk.
    auto meta = co_await meta_mutex_.lock();
    for (auto& w : plan) {
        uint64_t raw = format::encode_l2_standard(w.host, true, false);
        // An overwrite in place changes nothing: its slice stays clean, the next flush skips it.
        if (raw != w.old_raw || w.new_bitmap != w.old_bitmap)
            co_await store_l2_entry(l2_offset, w.l2_index, raw, w.new_bitmap);
        free_later(w.free_first, w.free_count);
    }
}

// ---- zeroing, allocation, resize ---------------------------------------------------------------

Task<std::vector<uint64_t>> Image::zero_in_table(uint64_t first, uint64_t count, bool discard, bool unmap) {
    const ClusterGeometry& g = geometry_;
    const uint32_t cb = g.cluster_bits;
    const bool v3 = meta_.header.version >= 3;
    // unmap: the clusters lie past the end of the disk or of the backing file, so unallocated
    // reads as zeros there (or is never read) whatever the version.
    const bool shows_through = backing_ != nullptr && !unmap;
    std::vector<uint64_t> need_data;
    const uint64_t l1_index = first / g.l2_entries();
    if (l1_index >= l1_.size()) co_return need_data;
    const bool mapped = (l1_[l1_index] & format::kL1OffsetMask) != 0;
    if (!mapped && !shows_through) co_return need_data;  // reads zeros already
    // v2 has no zero flag: only data can hide the backing file where it reaches; past its end an
    // unallocated cluster reads as zeros.
    auto backing_reaches = [&](uint64_t c) { return !v3 && shows_through && (c << cb) < backing_->size(); };
    if (!v3) {
        for (uint64_t c = first; c < first + count; ++c)
            if (backing_reaches(c)) need_data.push_back(c);
        if (!mapped) co_return need_data;  // the rest reads zeros already
    }
    uint64_t l2_offset = co_await l2_for_write(l1_index);
    for (uint64_t c = first; c < first + count; ++c) {
        if (backing_reaches(c)) continue;  // gets zeros written as data by the caller
        uint64_t index = c % g.l2_entries();
        auto [raw, bitmap] = co_await load_l2_entry(l2_offset, index);
        format::L2Entry e = co_await decode_l2_checked(raw, bitmap, c << cb);
        bool keep = false;  // keep the host cluster as a preallocated zero cluster
        if (data_file_) {
            // Data clusters sit at their guest offset; a raw data file must read as the disk does.
            keep = has_host(e) && !unmap;
            co_await data_file_->discard(c << cb, g.cluster_size());
        } else if (has_host(e)) {
            co_await check_host_cluster(e.host_offset, "data cluster of guest offset " + hex(c << cb));
            bool ours = e.copied || co_await refcounts_->get(e.host_offset >> cb) == 1;
            keep = ours && !discard && v3 && !unmap;
            if (!keep) {
                free_later(e.host_offset >> cb, 1);
                // Give the space back now: only this entry uses it, and a crash before the new
                // entry is on disk leaves it pointing at zeros, which is what was asked for.
                if (ours) co_await file_->discard(e.host_offset, g.cluster_size());
            }
        } else if (e.compressed) {
            auto [cf, cn] = compressed_clusters(e);
            free_later(cf, cn);
        }
        uint64_t new_raw = 0, new_bitmap = 0;
        bool zero = keep || shows_through || (!discard && !unmap);  // else unallocated reads as zeros too
        if (!v3) zero = false;
        if (g.extended_l2) {
            new_raw = keep ? format::encode_l2_standard(e.host_offset, true, false) : 0;
            new_bitmap = zero ? kZeroBitsAll : 0;
        } else {
            new_raw = keep ? format::encode_l2_standard(e.host_offset, true, true) : (zero ? format::kOflagZero : 0);
        }
        co_await store_l2_entry(l2_offset, index, new_raw, new_bitmap);
    }
    co_return need_data;
}

Task<void> Image::write_zeroes(uint64_t offset, uint64_t length, bool discard) {
    check_writable();
    if (offset > size() || length > size() - offset)
        fail(EINVAL, "zeroing " + std::to_string(length) + " bytes at " + std::to_string(offset) +
                         " passes the end of the disk (" + std::to_string(size()) + " bytes)");
    if (length == 0) co_return;
    {
        auto meta = co_await meta_mutex_.lock();
        check_writable();
        co_await prepare_write();
    }
    const uint64_t cs = geometry_.cluster_size();
    uint64_t first = offset / cs * cs;
    uint64_t last = (offset + length + cs - 1) / cs * cs;
    auto guard = co_await range_lock_->lock(first, last - first, cache::RangeLock::Mode::exclusive);
    co_await zero_locked(offset, length, discard);
}

Task<void> Image::zero_locked(uint64_t offset, uint64_t length, bool discard) {
    const ClusterGeometry& g = geometry_;
    const uint64_t cs = g.cluster_size();
    const uint64_t end = offset + length;
    const uint64_t last = (end + cs - 1) / cs * cs;

    // Whole clusters get metadata; a partial head and tail (and a last cluster cut by the end
    // of the disk) get zeros written as data.
    uint64_t whole_from = (offset + cs - 1) / cs * cs;
    uint64_t whole_to = end == size() ? last : end / cs * cs;
    if (whole_from >= whole_to) whole_from = whole_to = offset;
    std::vector<std::byte> zeros;
    auto write_zero_data = [&](uint64_t at, uint64_t n) -> Task<void> {
        while (n) {
            uint64_t k = std::min<uint64_t>(n, 1 << 20);
            zeros.resize(std::max<size_t>(zeros.size(), k));
            co_await write_locked(at, std::span<const std::byte>(zeros).first(k));
            at += k;
            n -= k;
        }
    };
    if (offset < whole_from) co_await write_zero_data(offset, std::min(whole_from, end) - offset);
    const uint64_t table_clusters = g.l2_entries();
    for (uint64_t c = whole_from / cs; c < whole_to / cs;) {
        uint64_t n = std::min(whole_to / cs - c, table_clusters - c % table_clusters);
        std::vector<uint64_t> need_data;
        {
            auto meta = co_await meta_mutex_.lock();
            check_writable();
            need_data = co_await zero_in_table(c, n, discard);
        }
        for (uint64_t d : need_data) co_await write_zero_data(d * cs, std::min(cs, size() - d * cs));
        c += n;
    }
    if (whole_to < end && whole_to >= whole_from && end > std::max(offset, whole_to))
        co_await write_zero_data(std::max(offset, whole_to), end - std::max(offset, whole_to));
}

Task<void> Image::allocate(uint64_t offset, uint64_t length) {
    check_writable();
    if (offset > size() || length > size() - offset)
        fail(EINVAL, "allocating " + std::to_string(length) + " bytes at " + std::to_string(offset) +
                         " passes the end of the disk");
    if (length == 0) co_return;
    const uint64_t cs = geometry_.cluster_size();
    const uint32_t cb = geometry_.cluster_bits;
    uint64_t first = offset / cs, last = (offset + length - 1) / cs;
    std::vector<std::byte> buf(cs);
    for (uint64_t c = first; c <= last; ++c) {
        // A cluster without a host cluster gets one holding what it reads as now (copy-on-write
        // with nothing new): the same path as a write, so every rule above applies.
        uint64_t at = c << cb, n = std::min<uint64_t>(cs, size() - at);
        auto guard = co_await range_lock_->lock(at, cs, cache::RangeLock::Mode::exclusive);
        uint64_t l1_index = geometry_.l1_index(GuestOffset{at});
        bool allocated_already = false;
        if (l1_index < l1_.size() && (l1_[l1_index] & format::kL1OffsetMask)) {
            auto [raw, bitmap] = co_await load_l2_entry(l1_[l1_index] & format::kL1OffsetMask, c % geometry_.l2_entries());
            format::L2Entry e = co_await decode_l2_checked(raw, bitmap, at);
            allocated_already = e.compressed || (has_host(e) && (!geometry_.extended_l2 || (bitmap & kAllocBitsAll) == kAllocBitsAll));
        }
        if (allocated_already) continue;
        co_await read_mapped(active_l1(), at, std::span<std::byte>(buf).first(n));
        {
            auto meta = co_await meta_mutex_.lock();
            check_writable();
            co_await prepare_write();
        }
        co_await write_locked(at, std::span<const std::byte>(buf).first(n));
    }
}

Task<void> Image::grow_l1(uint64_t entries, uint64_t new_size) {
    // Rule 3 for the table itself: every L2 table the in-memory L1 points at must be on disk
    // before a new L1 copy that points at them is made current.
    co_await flush_locked();
    const uint32_t cb = geometry_.cluster_bits;
    const uint64_t cs = geometry_.cluster_size();
    uint64_t bytes = entries * 8;
    if (bytes > format::kMaxL1Bytes) fail(EFBIG, "the L1 table would exceed " + std::to_string(format::kMaxL1Bytes) + " bytes");
    uint64_t clusters = (bytes + cs - 1) / cs;
    uint64_t table = co_await allocate_clusters(clusters);
    file_end_ = std::max(file_end_, table + clusters * cs);
    std::vector<std::byte> raw(clusters * cs);
    for (size_t i = 0; i < l1_.size(); ++i) format::store_be64(raw.data() + 8 * i, l1_[i]);
    co_await file_->write_at(table, raw);
    co_await refcounts_->flush();  // its refcount, then the table itself is synced below
    co_await file_->flush();
    uint64_t old = meta_.header.l1_table_offset;
    uint64_t old_clusters = (uint64_t{meta_.header.l1_size} * 8 + cs - 1) / cs;
    meta_.header.l1_table_offset = table;
    meta_.header.l1_size = static_cast<uint32_t>(entries);
    l1_.resize(entries, 0);
    dirty_l1_.clear();  // all of them are in the new table
    // One header write points at the new table and sets the size it was grown for (not earlier:
    // a refcount table move above rewrites the header too, and must not show the new size
    // with the old L1 table).
    meta_.header.size = new_size;
    co_await write_header();
    refresh_metadata_map();  // the new table lies where nothing was
    // The header no longer points at the old table: nothing references it.
    if (old_clusters) co_await refcounts_->update(old >> cb, old_clusters, -1);
}

Task<void> Image::release_beyond(uint64_t new_size) {
    const ClusterGeometry& g = geometry_;
    const uint32_t cb = g.cluster_bits;
    const uint64_t cs = g.cluster_size();
    const uint64_t table_clusters = g.l2_entries();
    uint64_t first = (new_size + cs - 1) / cs;  // first cluster wholly beyond the end
    uint64_t last = (size() + cs - 1) / cs;
    for (uint64_t c = first; c < last;) {
        uint64_t l1_index = c / table_clusters;
        uint64_t n = std::min(last - c, table_clusters - c % table_clusters);
        if (l1_index >= l1_.size()) break;
        uint64_t l2 = l1_[l1_index] & format::kL1OffsetMask;
        if (l2 == 0) {
            c += n;
            continue;
        }
        if (c % table_clusters == 0) {
            // The whole table is beyond the end: drop it with everything it maps.
            format::L1Entry e = format::decode_l1(l1_[l1_index], cb);
            if (e.copied) {
                for (uint64_t i = 0; i < table_clusters; ++i) {
                    auto [raw, bitmap] = co_await load_l2_entry(l2, i);
                    format::L2Entry le = co_await decode_l2_checked(raw, bitmap, (l1_index * table_clusters + i) << cb);
                    if (data_file_) continue;
                    if (has_host(le)) free_later(le.host_offset >> cb, 1);
                    else if (le.compressed) {
                        auto [cf, cn] = compressed_clusters(le);
                        free_later(cf, cn);
                    }
                }
            }
            // A table shared with a snapshot is impossible here (shrinking needs no snapshots),
            // but if only its refcount says so, releasing the table alone is still right.
            free_later(l2 >> cb, 1);
            metadata_map_.remove_l2(l2 >> cb);
            l1_[l1_index] = 0;
            dirty_l1_.insert(l1_index);
            c += n;
            continue;
        }
        // Past the new end nothing shows through: the clusters become unallocated (v2 too, which
        // has no zero flag), so that a later grow finds nothing stale there.
        co_await zero_in_table(c, n, true, true);
        c += n;
    }
}

Task<void> Image::resize(uint64_t new_size) {
    check_writable();
    const uint64_t old_size = size();
    if (new_size == old_size) co_return;
    if (new_size < old_size && !snapshots_.empty())
        fail(ENOTSUP, "cannot shrink an image that has internal snapshots");
    const uint64_t cs = geometry_.cluster_size();
    {
        auto meta = co_await meta_mutex_.lock();
        check_writable();
        co_await prepare_write();
    }
    uint64_t lo = std::min(old_size, new_size) / cs * cs;
    auto guard = co_await range_lock_->lock(lo, UINT64_MAX - lo, cache::RangeLock::Mode::exclusive);
    if (new_size < old_size) {
        auto flush_guard = co_await flush_mutex_.lock();
        auto meta = co_await meta_mutex_.lock();
        co_await release_beyond(new_size);
        co_await flush_locked();
        meta_.header.size = new_size;
        co_await write_header();
        co_return;
    }
    {
        auto flush_guard = co_await flush_mutex_.lock();
        auto meta = co_await meta_mutex_.lock();
        uint64_t entries = geometry_.l1_entries_for(new_size);
        if (entries > l1_.size()) {
            co_await grow_l1(std::max<uint64_t>(entries, l1_.size() + l1_.size() / 4), new_size);
        } else {
            meta_.header.size = new_size;
            co_await write_header();
        }
    }
    // The new part must read as zeros: the rest of the old last cluster may hold bytes from
    // before an earlier shrink, and a longer backing file would show through. Whole clusters, so
    // that no stale byte stays behind in the last one.
    uint64_t shown = std::max((old_size + cs - 1) / cs * cs, backing_ ? backing_->size() : 0);
    uint64_t zero_to = std::min(new_size, (shown + cs - 1) / cs * cs);
    if (zero_to > old_size) co_await zero_locked(old_size, zero_to - old_size, false);
    // Beyond that, unallocated reads as zeros: L2 tables still mapped there (left by another
    // writer's shrink) lose their entries.
    co_await unmap_from(zero_to);
}

Task<void> Image::unmap_from(uint64_t from) {
    const ClusterGeometry& g = geometry_;
    const uint64_t cs = g.cluster_size();
    const uint64_t table_clusters = g.l2_entries();
    const uint64_t last = (size() + cs - 1) / cs;
    for (uint64_t c = (from + cs - 1) / cs; c < last;) {
        uint64_t l1_index = c / table_clusters;
        uint64_t n = std::min(last - c, table_clusters - c % table_clusters);
        if (l1_index >= l1_.size()) break;
        if (l1_[l1_index] & format::kL1OffsetMask) {
            auto meta = co_await meta_mutex_.lock();
            check_writable();
            co_await zero_in_table(c, n, true, true);
        }
        c += n;
    }
}

// ---- flush -----------------------------------------------------------------------------------

Task<void> Image::flush_locked() {
    // Rule 1: data before the L2 entries pointing at it. Data in the image file is synced by the
    // refcount flush below (it always syncs); an external data file is synced here.
    if (data_file_) co_await data_file_->flush();
    // Rule 2: refcount increases (new clusters) on disk before any table that uses them. With
    // no metadata change at all (overwrites in place) one sync of the data is the whole flush.
    if (refcounts_->dirty())
        co_await refcounts_->flush();
    else
        co_await file_->flush();
    // Rule 3: L2 tables (new ones, and changed entries) on disk before L1 entries point at them.
    auto frees = std::move(pending_free_);
    pending_free_.clear();
    try {
        if (l2_cache_->dirty_slices()) {
            co_await l2_cache_->flush();
            co_await file_->flush();
        }
        if (!dirty_l1_.empty()) {
            // Changed L1 entries, a run of adjacent ones per write.
            std::vector<uint64_t> dirty(dirty_l1_.begin(), dirty_l1_.end());
            for (size_t i = 0; i < dirty.size();) {
                size_t j = i + 1;
                while (j < dirty.size() && dirty[j] == dirty[j - 1] + 1) ++j;
                std::vector<std::byte> raw(8 * (j - i));
                for (size_t k = i; k < j; ++k) format::store_be64(raw.data() + 8 * (k - i), l1_[dirty[k]]);
                co_await file_->write_at(meta_.header.l1_table_offset + 8 * dirty[i], raw);
                i = j;
            }
            co_await file_->flush();
            dirty_l1_.clear();
        }
    } catch (...) {
        pending_free_.insert(pending_free_.begin(), frees.begin(), frees.end());
        throw;
    }
    // Rule 4: nothing on disk points at these clusters any more; their refcounts may drop (and
    // reach the disk with the next flush).
    for (auto [first, count] : frees) co_await refcounts_->update(first, count, -1);
}

Task<void> Image::flush() {
    if (!prepared_ || !refcounts_) co_return;  // nothing was ever written
    auto flush_guard = co_await flush_mutex_.lock();
    auto meta = co_await meta_mutex_.lock();
    co_await flush_locked();
}

Task<void> Image::close() {
    if (!prepared_ || !refcounts_) co_return;
    {
        auto flush_guard = co_await flush_mutex_.lock();
        auto meta = co_await meta_mutex_.lock();
        co_await flush_locked();
        co_await refcounts_->flush();  // the refcount decreases of the flush above
        if (clear_dirty_bit_ && read_only_reason_.empty()) {
            meta_.header.incompatible_features &= ~format::kIncompatDirty;
            co_await write_header();
            clear_dirty_bit_ = false;
        }
        if (read_only_reason_.empty()) read_only_reason_ = "the image is closed";
    }
}

Task<void> Image::read_active(uint64_t offset, std::span<std::byte> buf) {
    if (!range_lock_) {
        co_await read_mapped(active_l1(), offset, buf);
        co_return;
    }
    auto guard = co_await range_lock_->lock(offset, buf.size(), cache::RangeLock::Mode::shared);
    co_await read_mapped(active_l1(), offset, buf);
}

}  // namespace qcowfs::qcow2
