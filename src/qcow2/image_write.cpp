// The write path of an Image: L2 tables made ours, allocation, copy-on-write and linking.
//
// A write runs in phases per L2 table it touches (docs/architecture.md, "How a FUSE write
// travels" and "Write ordering"):
//   look up and plan (meta_mutex_): make the L2 table ours (l2_for_write), decide per cluster in
//                        place / new cluster (plan_cluster), allocate the new clusters (one
//                        contiguous run when possible: allocate_new);
//   copy and write (no lock): read the old content the write does not cover, write old + new
//                        data (write_data), or give the new clusters back if that fails;
//   link (meta_mutex_):  point the L2 entries at the data, queue the old clusters for release
//                        (link_table).
// The guest range is held exclusively (whole clusters) throughout, so no other request sees or
// changes these clusters in between. Nothing reaches the disk's metadata until flush_locked().
#include <algorithm>
#include <bit>
#include <cstring>
#include <memory>

#include "qcowfs/format/entries.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "qcowfs/util/buffer_pool.hpp"
#include "write_support.hpp"

namespace qcowfs::qcow2 {

namespace {

/// Bits [first, last] of a 32-bit subcluster mask.
uint64_t subcluster_mask(uint32_t first, uint32_t last) {
    uint64_t upto = last >= 31 ? format::kSubclusterAllocBits : (uint64_t{1} << (last + 1)) - 1;
    return upto & ~((uint64_t{1} << first) - 1);
}

}  // namespace

/// One guest cluster of a write: the decision made in plan_cluster and carried out after.
struct Image::ClusterWrite {
    GuestCluster guest_cluster;
    uint64_t l2_index = 0;       // entry index in its L2 table
    uint64_t from = 0, to = 0;   // bytes of the cluster the write covers, [from, to)
    bool needs_new = false;      // data goes to a newly allocated cluster
    HostOffset host;             // destination host cluster
    uint64_t window_from = 0, window_to = 0;  // bytes written to the host cluster (old + new)
    uint64_t old_raw = 0, old_bitmap = 0;  // the entry as planned over (unchanged: not rewritten)
    uint64_t new_bitmap = 0;
    bool reads_zero = false;     // the cluster reads as zeros now, backing data hidden or absent
    HostCluster free_first;      // clusters released once the new entry is on disk
    uint64_t free_count = 0;
};

namespace {
/// Emptied vectors kept per thread for reuse, with their storage. A write's plan lives across
/// its waits, so it cannot sit in the coroutine frame inline without making the frame too large
/// for Asio's frame recycling (about 1 KiB); taking a vector from here costs no malloc once its
/// thread has served a plan as large. Bounded: kKept vectors of at most kMaxElements each.
template <class T>
struct SpareVectors {
    static constexpr size_t kKept = 32, kMaxElements = 64;
    static std::vector<T> take() {
        auto& s = stack();
        if (s.empty()) return {};
        std::vector<T> v = std::move(s.back());
        s.pop_back();
        return v;
    }
    static void give(std::vector<T>&& v) {
        auto& s = stack();
        if (v.capacity() == 0 || v.capacity() > kMaxElements || s.size() >= kKept) return;
        v.clear();
        s.push_back(std::move(v));
    }
    static std::vector<std::vector<T>>& stack() {
        thread_local std::vector<std::vector<T>> s = [] {
            std::vector<std::vector<T>> v;
            v.reserve(kKept);
            return v;
        }();
        return s;
    }
};
}  // namespace

/// One L2 table's part of a write: a plan per guest cluster, and the clusters allocated for it.
struct Image::TableWrite {
    TableWrite() : clusters(SpareVectors<ClusterWrite>::take()) {}
    ~TableWrite() { SpareVectors<ClusterWrite>::give(std::move(clusters)); }
    TableWrite(const TableWrite&) = delete;
    TableWrite& operator=(const TableWrite&) = delete;

    HostOffset l2_table;  // ours alone once planned
    std::vector<ClusterWrite> clusters;  // storage recycled per thread: no malloc per write
    HostOffset first_new;    // the first newly allocated cluster
    uint64_t allocated = 0;  // newly allocated clusters, contiguous from first_new
};

std::pair<uint64_t, uint64_t> Image::zeroed_l2_entry(HostOffset host, bool keep, bool zero) const {
    if (geometry_.extended_l2)
        return {keep ? format::encode_l2_standard(host.value, true, false) : 0, zero ? format::kSubclusterZeroBits : 0};
    return {keep ? format::encode_l2_standard(host.value, true, true) : (zero ? format::kOflagZero : 0), 0};
}

bool Image::fully_allocated(const format::L2Entry& e) const {
    return e.compressed || (has_host(e) && (!geometry_.extended_l2 || (e.bitmap & format::kSubclusterAllocBits) == format::kSubclusterAllocBits));
}

// ---- L2 entries ------------------------------------------------------------------------------

Task<std::pair<uint64_t, uint64_t>> Image::load_l2_entry(HostOffset l2_table, uint64_t index) {
    const SlicePosition at = slice_of(index * geometry_.l2_entry_size(), l2_cache_->slice_bytes());
    auto slice = co_await l2_cache_->get((l2_table + at.slice_start).value);
    const std::byte* p = slice->bytes.data() + at.in_slice;
    co_return std::make_pair(format::load_be64(p), geometry_.extended_l2 ? format::load_be64(p + 8) : 0);
}

Task<void> Image::store_l2_entry(HostOffset l2_table, uint64_t index, uint64_t raw, uint64_t bitmap) {
    const SlicePosition at = slice_of(index * geometry_.l2_entry_size(), l2_cache_->slice_bytes());
    auto slice = co_await l2_cache_->get_for_write((l2_table + at.slice_start).value);
    std::byte* p = slice->bytes.data() + at.in_slice;
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
    std::rethrow_exception(co_await signal_corruption(bad));
}

Task<HostOffset> Image::l2_for_write(uint64_t l1_index) {
    const ClusterGeometry& g = geometry_;
    const uint32_t cb = g.cluster_bits;
    const uint64_t cs = g.cluster_size();
    const size_t slice_bytes = l2_cache_->slice_bytes();
    format::L1Entry e;
    std::string bad;
    try {
        e = format::decode_l1(l1_[l1_index], cb);
    } catch (const std::system_error& ex) {
        bad = "L1 entry " + std::to_string(l1_index) + ": " + reason_of(ex);
    }
    if (!bad.empty()) std::rethrow_exception(co_await signal_corruption(bad));
    const HostOffset old = e.l2_table();
    if (old) {
        const bool ours = co_await check_host_cluster(old, {"L2 table of L1 entry ", l1_index, false}, e.copied,
                                                      kMetaActiveL2);
        if (e.copied) co_return old;
        if (ours) {
            // Only we use it (a snapshot that shared it is gone): just mark it ours.
            l1_[l1_index] = format::encode_l1({old.value, true});
            dirty_l1_.insert(l1_index);
            co_return old;
        }
    }
    // A new table: empty, or a copy of the one shared with a snapshot.
    const HostOffset table = co_await allocate_clusters(1);
    // Its space now (the table is written at the next flush): a full host file system fails this
    // write, rather than a later flush or close that would lose every write mapped through it.
    std::exception_ptr no_space;
    try {
        co_await file_->reserve(table.value, cs);
    } catch (const std::system_error&) {
        no_space = std::current_exception();
    }
    if (no_space) {
        co_await refcounts_->update(g.host_cluster(table), 1, -1);  // nothing refers to it yet
        std::rethrow_exception(no_space);
    }
    file_end_ = std::max(file_end_, (table + cs).value);
    for (uint64_t s = 0; s < cs; s += slice_bytes) {
        std::shared_ptr<const cache::Slice> copied;
        if (old) copied = co_await l2_cache_->get((old + s).value);
        auto slice = co_await l2_cache_->create((table + s).value);
        if (copied) std::memcpy(slice->bytes.data(), copied->bytes.data(), slice_bytes);
    }
    if (old) {
        // The copy keeps the entries (their clusters are still shared: no COPIED flags), and
        // the snapshot keeps the old table, whose refcount drops once our L1 entry is on disk.
        free_later(g.host_cluster(old), 1);
        metadata_map_.remove_l2(g.host_cluster(old).value);
    }
    l1_[l1_index] = format::encode_l1({table.value, true});
    dirty_l1_.insert(l1_index);
    metadata_map_.add_l2(g.host_cluster(table).value);
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
    // Every caller (a write, a copy-on-read copy, fallocate's copy of backing data) ran
    // prepare_write first: the bitmaps are in use on disk. Copies change no byte a read returns,
    // but they change what the image holds, and an incremental backup must see it.
    if (bitmaps_) bitmaps_->mark(offset, data.size());
    while (!data.empty()) {
        check_writable();
        uint64_t n = std::min<uint64_t>(data.size(), geometry_.remaining_in_l2_table(GuestOffset{offset}));
        co_await write_in_table(offset, data.first(n));
        offset += n;
        data = data.subspan(n);
    }
}

void Image::split_into_clusters(uint64_t offset, uint64_t length, TableWrite& t) const {
    const ClusterGeometry& g = geometry_;
    const GuestCluster first = g.guest_cluster(GuestOffset{offset}), last = g.guest_cluster(GuestOffset{offset + length - 1});
    auto& clusters = t.clusters;
    clusters.clear();
    clusters.reserve(last.value - first.value + 1);
    for (GuestCluster c = first; c <= last; c = c + 1) {
        ClusterWrite w;
        w.guest_cluster = c;
        w.l2_index = g.l2_index(g.offset_of(c));
        w.from = c == first ? g.offset_in_cluster(offset) : 0;
        w.to = c == last ? g.offset_in_cluster(offset + length - 1) + 1 : g.cluster_size();
        clusters.push_back(w);
    }
}

Task<void> Image::plan_cluster(ClusterWrite& w, HostOffset l2_table) {
    const ClusterGeometry& g = geometry_;
    const GuestOffset guest = g.offset_of(w.guest_cluster);
    auto [raw, bitmap] = co_await load_l2_entry(l2_table, w.l2_index);
    w.old_raw = raw;
    w.old_bitmap = bitmap;
    format::L2Entry e = co_await decode_l2_checked(raw, bitmap, guest.value);

    // Can the data go where the cluster already is?
    bool in_place = false;
    if (has_host(e)) {
        if (data_file_) {
            in_place = true;  // external data file: data clusters sit at their guest offset, no refcounts
        } else {
            in_place = co_await check_host_cluster(e.host(), {"data cluster of guest offset ", guest.value, true}, e.copied);
        }
    }
    w.needs_new = !in_place && !data_file_;
    // An external data file keeps each data cluster at its guest offset.
    w.host = in_place ? e.host() : (data_file_ ? HostOffset{guest.value} : HostOffset{});
    if (!in_place && has_host(e) && !data_file_) {
        w.free_first = g.host_cluster(e.host());
        w.free_count = 1;
    }
    if (e.compressed) std::tie(w.free_first, w.free_count) = compressed_clusters(e);
    // Nothing to copy around the write: no host data, and no backing data showing through (none
    // at all, or a zero cluster hiding it; subclusters are left to plan_window).
    w.reads_zero = !has_host(e) && !e.compressed && (!backing_ || (!g.extended_l2 && e.zero_flag));
    plan_window(w, e, in_place);
}

void Image::plan_window(ClusterWrite& w, const format::L2Entry& e, bool in_place) const {
    const ClusterGeometry& g = geometry_;
    if (!g.extended_l2) {
        // Without subclusters the whole cluster becomes data: in place into a data cluster only
        // the written bytes; anything else (new cluster, or a preallocated zero cluster) gets
        // the old content around the write.
        bool whole = !(in_place && !e.zero_flag);
        w.window_from = whole ? 0 : w.from;
        w.window_to = whole ? g.cluster_size() : w.to;
        w.new_bitmap = 0;
        return;
    }
    // Extended L2: only the touched subclusters become allocated; a cluster copied out of a
    // shared or compressed one keeps every subcluster the old one had allocated.
    const uint64_t ss = g.subcluster_size();
    uint32_t s0 = static_cast<uint32_t>(w.from / ss), s1 = static_cast<uint32_t>((w.to - 1) / ss);
    uint64_t touched = subcluster_mask(s0, s1);
    uint64_t alloc = e.compressed ? format::kSubclusterAllocBits : (e.bitmap & format::kSubclusterAllocBits);
    uint64_t zeros = e.compressed ? 0 : (e.bitmap >> 32);
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

Task<void> Image::plan_table(TableWrite& t, uint64_t l1_index) {
    t.l2_table = co_await l2_for_write(l1_index);
    for (auto& w : t.clusters) co_await plan_cluster(w, t.l2_table);
    for (auto& w : t.clusters) t.allocated += w.needs_new;
    if (t.allocated == 0) co_return;
    const uint64_t cs = geometry_.cluster_size();
    // Bytes at or past this offset of the file have never been written since the image was
    // opened (file_end_ counts every data and L2 cluster handed out; the file's size every write
    // that has completed), so they read as zeros. Only asked (an fstat) when some new cluster
    // would have nothing to copy around its write: not on every copy-on-write.
    const bool any_zero = std::any_of(t.clusters.begin(), t.clusters.end(),
                                      [](const ClusterWrite& w) { return w.needs_new && w.reads_zero; });
    const uint64_t fresh_from = any_zero ? std::max(file_end_, file_->size()) : 0;
    t.first_new = co_await allocate_clusters(t.allocated);
    file_end_ = std::max(file_end_, (t.first_new + t.allocated * cs).value);
    const bool fresh = any_zero && t.first_new.value >= fresh_from;
    HostOffset next = t.first_new;
    for (auto& w : t.clusters) {
        if (!w.needs_new) continue;
        w.host = next, next = next + cs;
        // A fresh cluster already reads as zeros around the write: write only the guest's bytes
        // (the file grows past its end, or a hole stays a hole), not a cluster of zeros.
        if (fresh && w.reads_zero) w.window_from = w.from, w.window_to = w.to;
    }
}

Task<void> Image::write_data(const TableWrite& t, uint64_t offset, std::span<const std::byte> data) {
    const auto& plan = t.clusters;
    const ClusterGeometry& g = geometry_;
    const uint64_t cs = g.cluster_size();
    const GuestOffset start{offset};  // of data[0]
    io::File& f = data_file_ ? *data_file_ : *file_;
    // One host write per run of clusters adjacent on the host and in their windows.
    for (size_t i = 0, j = 0; i < plan.size(); i = j) {
        for (j = i + 1; j < plan.size() && plan[j - 1].window_to == cs && plan[j].window_from == 0 &&
                        plan[j].host == plan[j - 1].host + cs;
             ++j) {
        }
        const std::span<const ClusterWrite> run(plan.data() + i, j - i);
        const HostOffset host_start = run.front().host + run.front().window_from;
        const HostOffset host_end = run.back().host + run.back().window_to;
        bool covered = std::all_of(run.begin(), run.end(), [](const ClusterWrite& w) {
            return w.window_from == w.from && w.window_to == w.to;
        });
        if (covered) {
            // Nothing old to keep around the data: it goes to the host as it came.
            const GuestOffset guest = g.offset_of(run.front().guest_cluster) + run.front().from;
            co_await f.write_at(host_start.value, data.subspan(guest - start, host_end - host_start));
            continue;
        }
        // Every byte of buf is filled below (old bytes around each write, then the write's own).
        const uint64_t n = host_end - host_start;
        PooledBuffer buf(n);  // a cluster or a few: from the buffer cache, not from malloc
        for (const ClusterWrite& w : run) {
            // The cluster's byte 0 (before buf when the run's first window starts inside it).
            std::byte* base = buf.data() + static_cast<ptrdiff_t>(w.host.value - host_start.value);
            co_await copy_around(w, base);
            const GuestOffset guest = g.offset_of(w.guest_cluster) + w.from;
            std::memcpy(base + w.from, data.data() + (guest - start), w.to - w.from);
        }
        co_await f.write_at(host_start.value, std::span<const std::byte>(buf.data(), n));
    }
}

Task<void> Image::copy_around(const ClusterWrite& w, std::byte* base) {
    const GuestOffset guest = geometry_.offset_of(w.guest_cluster);
    if (w.window_from < w.from && w.to < w.window_to) {
        // Old bytes on both sides: one read of the whole window (the write's own bytes are read
        // too and then overwritten), so a small write into a copied cluster costs one read of
        // the backing file, not two.
        co_await read_mapped(active_l1(), (guest + w.window_from).value,
                             std::span<std::byte>(base + w.window_from, w.window_to - w.window_from), nullptr,
                             io::ReadPurpose::copy);
        co_return;
    }
    if (w.window_from < w.from)
        co_await read_mapped(active_l1(), (guest + w.window_from).value,
                             std::span<std::byte>(base + w.window_from, w.from - w.window_from), nullptr,
                             io::ReadPurpose::copy);
    if (w.to < w.window_to)
        co_await read_mapped(active_l1(), (guest + w.to).value, std::span<std::byte>(base + w.to, w.window_to - w.to),
                             nullptr, io::ReadPurpose::copy);
}

Task<void> Image::release_new(const TableWrite& t) {
    if (t.allocated == 0) co_return;
    auto meta = co_await meta_mutex_.lock();
    try {
        co_await refcounts_->update(geometry_.host_cluster(t.first_new), t.allocated, -1);
    } catch (const std::system_error&) {
    }
}

Task<void> Image::link_table(const TableWrite& t) {
    for (const ClusterWrite& w : t.clusters) {
        uint64_t raw = format::encode_l2_standard(w.host.value, true, false);
        // An overwrite in place changes nothing: its slice stays clean, the next flush skips it.
        if (raw != w.old_raw || w.new_bitmap != w.old_bitmap)
            co_await store_l2_entry(t.l2_table, w.l2_index, raw, w.new_bitmap);
        free_later(w.free_first, w.free_count);
    }
}

Task<void> Image::write_in_table(uint64_t offset, std::span<const std::byte> data) {
    TableWrite t;
    split_into_clusters(offset, data.size(), t);
    {
        auto meta = co_await meta_mutex_.lock();
        check_writable();
        co_await plan_table(t, geometry_.l1_index(GuestOffset{offset}));
    }
    std::exception_ptr error;
    try {
        co_await write_data(t, offset, data);
    } catch (...) {
        error = std::current_exception();
    }
    if (error) {
        // Nothing points at the new clusters yet: give them back now.
        co_await release_new(t);
        std::rethrow_exception(co_await reported(error));
    }
    // The L2 entries point at the data; the old clusters go once that is on disk.
    auto meta = co_await meta_mutex_.lock();
    co_await link_table(t);
}

Task<std::optional<format::L2Entry>> Image::active_entry(GuestOffset guest) {
    const uint64_t l1_index = geometry_.l1_index(guest);
    if (l1_index >= l1_.size()) co_return std::nullopt;
    HostOffset l2_table;
    std::string bad;
    try {
        l2_table = format::decode_l1(l1_[l1_index], geometry_.cluster_bits).l2_table();
    } catch (const std::system_error& ex) {
        bad = "L1 entry " + std::to_string(l1_index) + ": " + reason_of(ex);
    }
    if (!bad.empty()) std::rethrow_exception(co_await signal_corruption(bad));
    if (!l2_table) co_return std::nullopt;
    auto [raw, bitmap] = co_await load_l2_entry(l2_table, geometry_.l2_index(guest));
    co_return co_await decode_l2_checked(raw, bitmap, guest.value);
}

Task<void> Image::allocate(uint64_t offset, uint64_t length) {
    check_writable();
    if (offset > size() || length > size() - offset)
        fail(EINVAL, "allocating " + std::to_string(length) + " bytes at " + std::to_string(offset) +
                         " passes the end of the disk");
    if (length == 0) co_return;
    {
        auto meta = co_await meta_mutex_.lock();
        check_writable();
        co_await prepare_write();
    }
    const ClusterGeometry& g = geometry_;
    const uint64_t cs = g.cluster_size();
    const uint64_t end = div_ceil(offset + length, cs) * cs;
    // One pass: a piece of at most 1 MiB (one cluster at least) inside one L2 table at a time;
    // its clusters without a host cluster of their own (for every subcluster) get one holding
    // what they read as now (backing data, compressed data, zeros): copy-on-write with nothing
    // new, through the write path, so every rule above applies. Adjacent ones are read at once
    // and written at once (contiguous new clusters); clusters already allocated are skipped.
    const uint64_t piece = std::max<uint64_t>(cs, 1u << 20);
    std::vector<std::byte> buf;
    for (uint64_t at = offset / cs * cs; at < end;) {
        const uint64_t piece_end = std::min({end, at + piece, at + g.remaining_in_l2_table(GuestOffset{at})});
        auto guard = co_await range_lock_->lock(at, piece_end - at, cache::RangeLock::Mode::exclusive);
        check_writable();
        const uint64_t disk_end = std::min(piece_end, size());
        std::vector<std::pair<uint64_t, uint64_t>> runs;  // (offset, end) to allocate
        {
            auto meta = co_await meta_mutex_.lock();
            check_writable();
            for (uint64_t c = at; c < disk_end; c += cs) {
                const std::optional<format::L2Entry> e = co_await active_entry(GuestOffset{c});
                if (e && fully_allocated(*e)) continue;
                const uint64_t c_end = std::min(c + cs, disk_end);
                if (!runs.empty() && runs.back().second == c)
                    runs.back().second = c_end;
                else
                    runs.emplace_back(c, c_end);
            }
        }
        for (auto [from, to] : runs) {
            buf.resize(to - from);
            std::exception_ptr error;
            try {
                co_await read_mapped(active_l1(), from, buf, nullptr, io::ReadPurpose::copy);
            } catch (...) {
                error = std::current_exception();
            }
            if (error) std::rethrow_exception(co_await reported(error));
            co_await write_locked(from, buf);
        }
        at = piece_end;
    }
}

}  // namespace qcowfs::qcow2
