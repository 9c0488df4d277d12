// Allocation status of guest ranges (qemu-img map's "data"), for SEEK_DATA and SEEK_HOLE.
#include <algorithm>
#include <bit>
#include <optional>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/qcow2/image.hpp"

namespace qcowfs::qcow2 {

format::L2Entry Image::decode_l2_for_read(uint64_t raw, uint64_t bitmap, uint64_t guest) const {
    format::L2Entry e;
    try {
        e = format::decode_l2(raw, bitmap, geometry_, meta_.header.version, data_file_ != nullptr);
    } catch (const std::system_error& ex) {
        corruption("L2 entry for guest offset " + hex(guest) + ": " + reason_of(ex));
    }
    if (e.compressed && data_file_) corruption("compressed cluster in an image with an external data file");
    return e;
}

Task<MapRun> RawSource::map(uint64_t offset) {
    auto [data, end] = file_->data_run(offset);
    co_return MapRun{data, std::clamp<uint64_t>(end, offset + 1, size_)};
}

Task<MapRun> View::map(uint64_t offset) {
    if (active_) co_return co_await image_->view_map(nullptr, offset, size());
    const Image::L1Table l1{nullptr, l1_offset_, l1_size_};
    co_return co_await image_->view_map(&l1, offset, size_);
}

Task<MapRun> Image::view_map(const L1Table* snapshot, uint64_t offset, uint64_t size) {
    std::exception_ptr error;
    try {
        if (snapshot) co_return co_await map_mapped(*snapshot, offset, size);
        if (!range_lock_) co_return co_await map_mapped(active_l1(), offset, size);
        // Shared, like a read: no write changes the entries of this range meanwhile.
        const uint64_t table_end = std::min(size, offset + geometry_.remaining_in_l2_table(GuestOffset{offset}));
        auto guard = co_await range_lock_->lock(offset, table_end - offset, cache::RangeLock::Mode::shared);
        co_return co_await map_mapped(active_l1(), offset, size);
    } catch (...) {
        error = std::current_exception();
    }
    std::rethrow_exception(co_await reported(error));
}

Task<MapRun> Image::map_below(uint64_t offset, uint64_t end) {
    if (!backing_ || offset >= backing_->size()) co_return MapRun{false, end};
    MapRun below = co_await backing_->map(offset);
    below.end = std::min(below.end, end);
    co_return below;
}

namespace {

/// What qemu-img map says of a guest byte: data here, a hole (reads as zeros), or whatever the
/// backing chain says.
enum class MapKind { data, hole, below };

/// The status of subcluster `sc` of entry `e` (compressed: the whole cluster is data).
MapKind map_kind(const format::L2Entry& e, uint32_t sc, const ClusterGeometry& g) {
    if (e.compressed) return MapKind::data;
    switch (format::subcluster_type(e, sc, g)) {
        case format::SubclusterType::normal:
        case format::SubclusterType::compressed:
            return MapKind::data;
        case format::SubclusterType::zero_plain:
        case format::SubclusterType::zero_alloc:
            return MapKind::hole;
        case format::SubclusterType::unallocated_plain:
        case format::SubclusterType::unallocated_alloc:
            return MapKind::below;
    }
    return MapKind::below;
}

}  // namespace

Task<MapRun> Image::map_mapped(const L1Table& l1, uint64_t offset, uint64_t size) {
    const ClusterGeometry& g = geometry_;
    const uint64_t l1_index = g.l1_index(GuestOffset{offset});
    const uint64_t table_end = std::min(size, offset + g.remaining_in_l2_table(GuestOffset{offset}));
    const HostOffset l2_table = co_await l2_table_for_read(l1, l1_index);
    if (!l2_table) co_return co_await map_below(offset, table_end);

    // Walk this table's entries from `offset` while the status stays that of the first byte:
    // one status per subcluster (one "subcluster" per cluster without extended L2; one per
    // compressed cluster).
    std::optional<MapKind> first;
    const size_t slice_bytes = l2_cache_->slice_bytes();
    const uint32_t entry_size = g.l2_entry_size();
    uint64_t pos = offset;
    while (pos < table_end) {
        const SlicePosition first_entry = slice_of(g.l2_entry_byte(GuestOffset{pos}), slice_bytes);
        auto slice = co_await l2_cache_->get((l2_table + first_entry.slice_start).value);
        for (uint64_t at = first_entry.in_slice; at < slice_bytes && pos < table_end; at += entry_size) {
            const std::byte* p = slice->bytes.data() + at;
            const format::L2Entry e =
                decode_l2_for_read(format::load_be64(p), g.extended_l2 ? format::load_be64(p + 8) : 0, pos);
            const uint64_t cluster_end = std::min(table_end, (pos | g.cluster_mask()) + 1);
            while (pos < cluster_end) {
                const uint32_t sc = g.subcluster_index(GuestOffset{pos});
                const MapKind kind = map_kind(e, sc, g);
                if (!first) first = kind;
                if (kind != *first) goto done;
                pos = e.compressed ? cluster_end
                                   : std::min(table_end, pos - g.offset_in_cluster(pos) + (uint64_t{sc + 1} << g.subcluster_bits()));
            }
        }
    }
done:
    if (*first == MapKind::below) co_return co_await map_below(offset, pos);
    co_return MapRun{*first == MapKind::data, pos};
}

}  // namespace qcowfs::qcow2
