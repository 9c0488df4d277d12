// Making an image writable: refcounts, the overlap map, the first write's checks, and the one corruption path.
#include <algorithm>
#include <cstring>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/qcow2/bitmaps.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "qcowfs/qcow2/rebuild.hpp"
#include "write_support.hpp"

namespace qcowfs::qcow2 {

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
        if (uint64_t l2 = format::decode_l1(raw, cb).l2_offset) l2_tables.push_back(l2 >> cb);
    metadata_map_.set_l2(std::move(l2_tables));
    std::string bad;
    try {
        for (auto& a : co_await bitmap_metadata_areas(*file_, meta_)) {
            auto [first, end] = geometry_.clusters_spanned(HostOffset{a.offset}, a.bytes);
            bitmap_areas_.push_back({first.value, end.value, kMetaBitmapTable, a.what});
        }
        if (!bitmap_areas_.empty()) bitmap_areas_.front().kind = kMetaBitmapDirectory;
        bitmaps_ = co_await DirtyBitmaps::load(*file_, meta_, size());
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
    const auto& h = meta_.header;
    auto area = [&](uint64_t offset, uint64_t bytes, MetadataKind kind, std::string what) {
        auto [first, end] = geometry_.clusters_spanned(HostOffset{offset}, bytes);
        return MetadataMap::Area{first.value, end.value, kind, std::move(what)};
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

Task<HostOffset> Image::allocate_clusters(uint64_t count) {
    std::string problem;
    try {
        co_return geometry_.offset_of(co_await refcounts_->allocate(count));
    } catch (const PlacementConflict& e) {
        problem = reason_of(e);
    }
    std::rethrow_exception(co_await signal_corruption(problem));
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
    if (meta_.header.dirty())
        co_await rebuild_dirty_refcounts();
    else
        co_await check_refcounts_cover_references();
    // Active L2 tables are written in place by flushes: none may lie in other metadata (checked
    // here once, whether or not the scan above ran; later tables are checked as they are made).
    for (uint64_t c : metadata_map_.l2_tables())
        if (auto what = metadata_map_.find(c, 1, kMetaActiveL2, refcounts_.get()))
            std::rethrow_exception(co_await signal_corruption("L2 table at " + hex(c << geometry_.cluster_bits) + " lies in " + *what));
    co_await claim_header_for_writing();
    prepared_ = true;
}

Task<void> Image::rebuild_dirty_refcounts() {
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
                                   ScanLimits{options_.refcount_memory, options_.scan_limit});
    } catch (const std::system_error& e) {
        if (errno_of(e) != ECANCELED) throw;
        too_much = reason_of(e);
    }
    if (!too_much.empty()) {
        // Not corrupt, only too large for the limit: later writes are refused at once.
        read_only_reason_ = "the dirty image needs a refcount rebuild, but " + too_much;
        fail(EIO, read_only_reason_);
    }
    auto fresh = std::make_unique<Refcounts>(*file_, meta_.header, 1u << 20);
    co_await fresh->load();
    refcounts_ = std::move(fresh);
    install_refcount_hooks();
    file_end_ = std::max(file_end_, file_->size());
}

Task<void> Image::check_refcounts_cover_references() {
    // The allocator trusts refcounts: a used cluster whose refcount is too low would be handed
    // out again and overwritten. Find that before the first write, not after. Past the scan
    // limit the check is skipped: the overlap check still keeps allocations off metadata.
    // The refcount table and blocks are written in place: a table entry that names one of their
    // clusters (as data, an L2 table, ...) would see every allocation change it.
    std::optional<std::pair<uint64_t, uint64_t>> under;
    std::optional<uint64_t> aliased;
    std::string bad;
    try {
        co_await count_references(*file_, meta_, snapshots_, ScanLimits{options_.refcount_memory, options_.scan_limit},
                                  refcounts_->block_entries(),
                                  [&](uint64_t first, std::vector<uint64_t>& counts, bool last) -> Task<void> {
                                      if (!aliased)
                                          for (uint64_t c : refcounts_->refcount_metadata_in(first, first + counts.size()))
                                              if (counts[c - first] != 0) {
                                                  aliased = c;
                                                  break;
                                              }
                                      if (!under) under = co_await refcounts_->find_undercounted(first, counts, last);
                                  });
    } catch (const std::system_error& e) {
        if (errno_of(e) != ECANCELED) bad = reason_of(e);
    }
    if (!bad.empty()) std::rethrow_exception(co_await signal_corruption(bad));
    if (aliased)
        std::rethrow_exception(co_await signal_corruption("refcount metadata at " + hex(*aliased << geometry_.cluster_bits) +
                                                          " is also used by the image's tables"));
    if (under)
        std::rethrow_exception(co_await signal_corruption("cluster at " + hex(under->first << geometry_.cluster_bits) +
                                         " is in use but its refcount is " + std::to_string(under->second)));
}

Task<void> Image::claim_header_for_writing() {
    auto& h = meta_.header;
    bool header_changed = false;
    // The enabled bitmaps are kept up to date in memory and written back at close: until then
    // they are in use, set before the first write can make the stored bits stale (disabled ones
    // and those already in use stay as they are).
    if (bitmaps_) co_await bitmaps_->mark_in_use(*file_, false);
    // Autoclear bits qcowfs keeps true: bitmaps (kept up to date), and the raw external data
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
}

Task<void> Image::write_header() {
    // Only the fixed fields qcowfs changes (one sector): the extensions, the backing name and its
    // offset stay exactly where the image's creator put them.
    co_await file_->write_at(0, format::serialize_fixed_header(meta_.header));
    co_await file_->flush();
}

// ---- corruption --------------------------------------------------------------------------------

void Image::corruption(const std::string& reason) const { throw ImageCorruption(this, reason); }

bool Image::corruption_is_fatal() const { return write_locked_ && read_only_reason_.empty(); }

Task<std::exception_ptr> Image::signal_corruption(std::string reason) {
    if (corruption_is_fatal()) {
        read_only_reason_ = "marked corrupt: " + reason;
        meta_.header.incompatible_features |= format::kIncompatCorrupt;
        try {
            co_await write_header();
        } catch (const std::system_error&) {
            // The image stays read-only for us either way.
        }
        if (options_.on_corrupt) options_.on_corrupt(reason);
    }
    co_return std::make_exception_ptr(std::system_error(std::error_code(EIO, std::generic_category()), reason));
}

Task<std::exception_ptr> Image::reported(std::exception_ptr error) {
    std::string reason;
    bool ours = false;
    try {
        std::rethrow_exception(error);
    } catch (const ImageCorruption& e) {
        ours = e.image == this;
        reason = reason_of(e);
    } catch (...) {
    }
    if (!ours) co_return error;
    if (!corruption_is_fatal()) co_return co_await signal_corruption(std::move(reason));
    // The corrupt bit goes into the header, which only meta_mutex_ holders write.
    auto meta = co_await meta_mutex_.lock();
    co_return co_await signal_corruption(std::move(reason));
}

Task<bool> Image::check_host_cluster(HostOffset host, ClusterName what, bool copied, uint32_t ignore) {
    const HostCluster c = geometry_.host_cluster(host);
    std::string problem;
    uint64_t refcount = 0;
    if (c == HostCluster{0})
        problem = "points into the image header";
    else if (host.value >= file_end_)
        problem = "points beyond the end of the file (" + std::to_string(file_end_) + " bytes)";
    else if (auto meta = metadata_map_.find(c.value, 1, ignore, refcounts_.get()))
        problem = "points into " + *meta;
    if (problem.empty()) {
        refcount = co_await refcounts_->get(c);
        if (refcount == 0)
            problem = "is in use but its refcount is 0";
        else if (copied && refcount != 1)
            // QEMU trusts the flag and would write into a cluster a snapshot still reads.
            problem = "has the COPIED flag but its refcount is " + std::to_string(refcount);
    }
    if (!problem.empty()) std::rethrow_exception(co_await signal_corruption(what.str() + " at " + hex(host.value) + " " + problem));
    co_return refcount == 1;
}

void Image::free_later(HostCluster first, uint64_t count) {
    if (count) pending_free_.emplace_back(first, count);
}

std::pair<HostCluster, uint64_t> Image::compressed_clusters(const format::L2Entry& e) const {
    // The compressed bytes start in the 512-byte sector holding host_offset.
    auto [first, end] = geometry_.clusters_spanned(HostOffset{e.host_offset & ~uint64_t{511}},
                                                   e.compressed_size + (e.host_offset & 511));
    return {first, end - first};
}

}  // namespace qcowfs::qcow2
