// Persistent dirty bitmaps of an image: their view as a disk, and writing them back at close.
#include <algorithm>
#include <cstring>

#include "qcowfs/format/bitmaps.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "write_support.hpp"

namespace qcowfs::qcow2 {

// ---- BitmapView ---------------------------------------------------------------------------------

uint64_t BitmapView::size() const { return image_->size(); }

Task<MapRun> BitmapView::map(uint64_t offset) {
    DirtyBitmaps* bitmaps = co_await image_->dirty_bitmaps();
    auto [dirty, end] = co_await bitmaps->run(*image_->file_, bitmaps->find(name_), offset, size());
    co_return MapRun{dirty, end};
}

Task<void> BitmapView::read(uint64_t offset, std::span<std::byte> buf) {
    const uint64_t size = this->size();
    if (offset >= size) {
        std::memset(buf.data(), 0, buf.size());
        co_return;
    }
    if (buf.size() > size - offset) {
        std::memset(buf.data() + (size - offset), 0, buf.size() - (size - offset));
        buf = buf.first(size - offset);
    }
    std::shared_ptr<View> active = image_->active();
    while (!buf.empty()) {
        const MapRun run = co_await map(offset);
        const size_t n = static_cast<size_t>(std::min<uint64_t>(run.end - offset, buf.size()));
        if (run.data)
            co_await active->read(offset, buf.first(n));
        else
            std::memset(buf.data(), 0, n);
        offset += n;
        buf = buf.subspan(n);
    }
}

// ---- Image --------------------------------------------------------------------------------------

Task<std::shared_ptr<BitmapView>> Image::bitmap(const std::string& name) {
    (co_await dirty_bitmaps())->find(name);  // ENOENT / EIO now, not at the first read
    co_return std::make_shared<BitmapView>(shared_from_this(), name);
}

Task<DirtyBitmaps*> Image::dirty_bitmaps() {
    if (!bitmaps_) {
        std::unique_ptr<DirtyBitmaps> loaded;
        try {
            loaded = co_await DirtyBitmaps::load(*file_, meta_, size());
        } catch (const std::system_error& e) {
            fail(errno_of(e), "bitmaps: " + reason_of(e));
        }
        if (!bitmaps_) bitmaps_ = std::move(loaded);  // another coroutine may have loaded them meanwhile
    }
    co_return bitmaps_.get();
}

Task<void> Image::store_bitmaps() {
    if (!bitmaps_ || !bitmaps_->marked_in_use()) co_return;
    const uint64_t cs = geometry_.cluster_size();
    const uint32_t cb = geometry_.cluster_bits;
    auto clusters_for = [cs](uint64_t bytes) { return (bytes + cs - 1) / cs; };
    std::vector<std::pair<HostCluster, uint64_t>> old;  // released once nothing points at them
    auto release = [&](uint64_t offset, uint64_t count) {
        if (offset && count) old.emplace_back(geometry_.host_cluster(HostOffset{offset}), count);
    };
    // New clusters: written in full, so the file grows past them (or reuses freed ones).
    auto write_new = [&](std::span<const std::byte> bytes) -> Task<uint64_t> {
        const uint64_t n = clusters_for(bytes.size());
        const HostOffset at = co_await allocate_clusters(n);
        file_end_ = std::max(file_end_, at.value + n * cs);
        std::vector<std::byte> padded(n * cs);
        std::memcpy(padded.data(), bytes.data(), bytes.size());
        co_await file_->write_at(at.value, padded);
        co_return at.value;
    };

    std::vector<format::BitmapDirectoryEntry> directory = bitmaps_->directory();
    for (DirtyBitmaps::Bitmap& b : bitmaps_->tracked()) {
        if (!b.marked) continue;  // a disabled bitmap the disk's size never changed under
        const uint64_t entries = format::bitmap_table_entries(size(), b.entry.granularity_bits, cb);
        if (entries > 0x8000000) fail(EFBIG, "bitmap '" + b.entry.name + "' would need more than 2^27 table entries");
        std::vector<uint64_t> table(entries, 0);
        bool changed = entries != b.table.size();
        // Rule: a bitmap's data clusters before the table that names them.
        for (uint64_t i = 0; i < entries; ++i) {
            const uint64_t stored = i < b.table.size() ? b.table[i] : 0;
            if (!bitmaps_->page_changed(b, i)) {
                table[i] = stored;
                continue;
            }
            changed = true;
            std::vector<uint8_t> page = co_await bitmaps_->page(*file_, b, i);
            release(format::decode_bitmap_table_entry(stored, cb), 1);
            if (std::all_of(page.begin(), page.end(), [](uint8_t v) { return v == 0; })) continue;  // 0: all zeros
            table[i] = co_await write_new(std::as_bytes(std::span(page)));
        }
        for (uint64_t i = entries; i < b.table.size(); ++i) release(format::decode_bitmap_table_entry(b.table[i], cb), 1);
        auto& entry = directory[std::find_if(directory.begin(), directory.end(), [&](const auto& e) {
                                    return e.position == b.entry.position;
                                }) - directory.begin()];
        entry.flags &= ~format::kBitmapInUse;
        if (!changed) continue;  // the table stays; only the flag changes
        std::vector<std::byte> raw(entries * 8);
        for (uint64_t i = 0; i < entries; ++i) format::store_be64(raw.data() + 8 * i, table[i]);
        entry.table_offset = co_await write_new(raw);
        entry.table_size = static_cast<uint32_t>(entries);
        release(b.entry.table_offset, clusters_for(uint64_t{b.entry.table_size} * 8));
    }
    // Then the directory, in a new place; refcounts of everything new on disk and synced before
    // the header extension points at it (rule 2), so a crash before leaves the old directory.
    const std::vector<std::byte> dir = format::serialize_bitmap_directory(directory);
    const uint64_t dir_offset = co_await write_new(dir);
    co_await refcounts_->flush();
    co_await file_->flush();
    format::BitmapsExtension& ext = *meta_.extensions.bitmaps;
    const uint64_t old_dir = ext.bitmap_directory_offset, old_dir_bytes = ext.bitmap_directory_size;
    std::vector<std::byte> cluster0(std::min<uint64_t>(cs, file_->size()));
    cluster0.resize(co_await file_->read_at(0, cluster0));
    const auto position = format::bitmaps_extension_position(cluster0, meta_.header);
    if (!position) corrupt("the bitmaps header extension is gone from the header");
    ext.bitmap_directory_offset = dir_offset;
    ext.bitmap_directory_size = dir.size();
    co_await file_->write_at(*position, format::serialize_bitmaps_extension(ext));
    co_await file_->flush();
    // Nothing points at the old directory, tables and pages any more.
    release(old_dir, clusters_for(old_dir_bytes));
    for (auto [first, count] : old) co_await refcounts_->update(first, count, -1);
    co_await refcounts_->flush();
}

}  // namespace qcowfs::qcow2
