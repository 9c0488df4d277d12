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
        corrupt("L2 entry for guest offset " + hex(guest) + ": " + reason_of(ex));
    }
    if (e.compressed && data_file_) corrupt("compressed cluster in an image with an external data file");
    return e;
}

Task<MapRun> RawSource::map(uint64_t offset) {
    auto [data, end] = file_->data_run(offset);
    co_return MapRun{data, std::clamp<uint64_t>(end, offset + 1, size_)};
}

Task<MapRun> View::map(uint64_t offset) {
    if (!active_) co_return co_await image_->map_mapped(Image::L1Table{nullptr, l1_offset_, l1_size_}, offset, size_);
    co_return co_await image_->map_active(offset);
}

Task<MapRun> Image::map_active(uint64_t offset) {
    if (!range_lock_) co_return co_await map_mapped(active_l1(), offset, size());
    // Shared, like a read: no write changes the entries of this range meanwhile.
    const uint64_t coverage = uint64_t{1} << (geometry_.cluster_bits + std::countr_zero(geometry_.l2_entries()));
    const uint64_t table_end = std::min(size(), (offset / coverage + 1) * coverage);
    auto guard = co_await range_lock_->lock(offset, table_end - offset, cache::RangeLock::Mode::shared);
    co_return co_await map_mapped(active_l1(), offset, size());
}

Task<MapRun> Image::map_below(uint64_t offset, uint64_t end) {
    if (!backing_ || offset >= backing_->size()) co_return MapRun{false, end};
    MapRun below = co_await backing_->map(offset);
    below.end = std::min(below.end, end);
    co_return below;
}

Task<MapRun> Image::map_mapped(const L1Table& l1, uint64_t offset, uint64_t size) {
    const ClusterGeometry& g = geometry_;
    const uint64_t coverage_bits = g.cluster_bits + std::countr_zero(g.l2_entries());
    const uint64_t l1_index = offset >> coverage_bits;
    const uint64_t table_end = std::min(size, (l1_index + 1) << coverage_bits);

    uint64_t l2_offset = 0;
    if (l1_index < l1.size) {
        const uint64_t raw = co_await l1_entry(l1, l1_index);
        try {
            l2_offset = format::decode_l1(raw, g.cluster_bits).l2_offset;
        } catch (const std::system_error& e) {
            corrupt("L1 entry " + std::to_string(l1_index) + ": " + reason_of(e));
        }
    }
    if (l2_offset == 0) co_return co_await map_below(offset, table_end);
    if (l2_offset < g.cluster_size()) corrupt("L1 entry " + std::to_string(l1_index) + " points into the image header");

    // Walk this table's entries from `offset` while the status stays that of the first byte.
    enum class Kind { data, hole, below };
    std::optional<Kind> first;
    const size_t slice_bytes = l2_cache_->slice_bytes();
    const uint32_t entry_size = g.l2_entry_size();
    uint64_t pos = offset;
    while (pos < table_end) {
        const uint64_t entry_byte = g.l2_index(GuestOffset{pos}) * entry_size;
        const uint64_t slice_start = entry_byte / slice_bytes * slice_bytes;
        auto slice = co_await l2_cache_->get(l2_offset + slice_start);
        for (uint64_t at = entry_byte - slice_start; at < slice_bytes && pos < table_end; at += entry_size) {
            const std::byte* p = slice->bytes.data() + at;
            const format::L2Entry e =
                decode_l2_for_read(format::load_be64(p), g.extended_l2 ? format::load_be64(p + 8) : 0, pos);
            const uint64_t cluster_end = (pos | (g.cluster_size() - 1)) + 1;
            // One status per subcluster (one "subcluster" per cluster without extended L2).
            for (uint32_t sc = g.subcluster_index(GuestOffset{pos}); pos < std::min(cluster_end, table_end); ++sc) {
                Kind kind = Kind::data;
                uint64_t next = std::min(table_end, pos - g.offset_in_cluster(pos) + (uint64_t{sc + 1} << g.subcluster_bits()));
                if (e.compressed) {
                    next = std::min(table_end, cluster_end);
                } else {
                    switch (format::subcluster_type(e, sc, g)) {
                        case format::SubclusterType::normal:
                        case format::SubclusterType::compressed:
                            kind = Kind::data;
                            break;
                        case format::SubclusterType::zero_plain:
                        case format::SubclusterType::zero_alloc:
                            kind = Kind::hole;
                            break;
                        case format::SubclusterType::unallocated_plain:
                        case format::SubclusterType::unallocated_alloc:
                            kind = Kind::below;
                            break;
                    }
                }
                if (!first) first = kind;
                if (kind != *first) goto done;
                pos = next;
            }
        }
    }
done:
    if (*first == Kind::below) co_return co_await map_below(offset, pos);
    co_return MapRun{*first == Kind::data, pos};
}

}  // namespace qcowfs::qcow2
