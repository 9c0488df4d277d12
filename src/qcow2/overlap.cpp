// The metadata map of a writable image: which host clusters hold metadata, checked before writes.
#include "qcowfs/qcow2/overlap.hpp"

#include <algorithm>

#include "qcowfs/qcow2/refcount.hpp"

namespace qcowfs::qcow2 {

std::optional<std::string> MetadataMap::set_fixed(std::vector<Area> areas) {
    std::erase_if(areas, [](const Area& a) { return a.end <= a.first; });
    std::sort(areas.begin(), areas.end(), [](const Area& a, const Area& b) { return a.first < b.first; });
    for (size_t i = 1; i < areas.size(); ++i)
        if (areas[i].first < areas[i - 1].end) return areas[i - 1].what + " overlaps " + areas[i].what;
    fixed_ = std::move(areas);
    return std::nullopt;
}

void MetadataMap::set_l2(std::vector<uint64_t> clusters) {
    std::sort(clusters.begin(), clusters.end());
    clusters.erase(std::unique(clusters.begin(), clusters.end()), clusters.end());
    l2_ = std::move(clusters);
}

void MetadataMap::add_l2(uint64_t cluster) {
    auto it = std::lower_bound(l2_.begin(), l2_.end(), cluster);
    if (it == l2_.end() || *it != cluster) l2_.insert(it, cluster);
}

void MetadataMap::remove_l2(uint64_t cluster) {
    auto it = std::lower_bound(l2_.begin(), l2_.end(), cluster);
    if (it != l2_.end() && *it == cluster) l2_.erase(it);
}

bool MetadataMap::is_l2(uint64_t cluster) const { return std::binary_search(l2_.begin(), l2_.end(), cluster); }

std::optional<std::string> MetadataMap::find(uint64_t first, uint64_t count, uint32_t ignore,
                                             const Refcounts* refcounts) const {
    if (count == 0) return std::nullopt;
    const uint64_t end = first + count < first ? UINT64_MAX : first + count;
    // Fixed areas are disjoint and sorted, so their ends are sorted too: the areas that can meet
    // [first, end) are those from the last one starting at or before `first` on.
    auto it = std::upper_bound(fixed_.begin(), fixed_.end(), first, [](uint64_t c, const Area& a) { return c < a.first; });
    if (it != fixed_.begin()) --it;
    for (; it != fixed_.end() && it->first < end; ++it)
        if (it->end > first && !(ignore & it->kind)) return it->what;
    if (!(ignore & kMetaActiveL2)) {
        auto l2 = std::lower_bound(l2_.begin(), l2_.end(), first);
        if (l2 != l2_.end() && *l2 < end) return "an L2 table";
    }
    if (refcounts && !(ignore & (kMetaRefcountBlock | kMetaRefcountTable)) && refcounts->holds_refcount_metadata(first, end))
        return "the refcount table or a refcount block";
    return std::nullopt;
}

}  // namespace qcowfs::qcow2
