// Disk: an open image served as one file — views, the write-back cache, size changes and flushes.
#include "qcowfs/qcow2/disk.hpp"

#include <algorithm>
#include <boost/asio/this_coro.hpp>
#include <cstring>
#include <limits>

#include "qcowfs/format/error.hpp"
#include "qcowfs/util/log.hpp"

namespace qcowfs::qcow2 {

Task<std::unique_ptr<Disk>> Disk::open(std::string path, OpenOptions options, DiskOptions disk_options) {
    std::shared_ptr<Image> image;
    if (options.writable) {
        int denied = 0;
        try {
            image = co_await Image::open(path, options);
        } catch (const std::system_error& e) {
            denied = errno_of(e);
            if (denied != EACCES && denied != EROFS && denied != EPERM) throw;
        }
        if (denied) {
            log::debug(path + ": cannot be opened for writing (" + std::strerror(denied) + "), read-only");
            options.writable = false;
        }
    }
    if (!image) image = co_await Image::open(path, options);
    auto executor = co_await asio::this_coro::executor;
    co_return std::make_unique<Disk>(executor, std::move(image), options.writable, std::move(disk_options));
}

Disk::Disk(Executor executor, std::shared_ptr<Image> image, bool writable, DiskOptions options)
    : image_(std::move(image)),
      active_(image_->active()),
      size_lock_(std::move(executor)),
      on_resize_(std::move(options.on_resize)) {
    if (writable && image_->read_only_reason().empty())
        cache_ = std::make_unique<cache::DataCache>(*active_, options.write_cache_bytes);
}

Disk::~Disk() = default;

Task<std::shared_ptr<BlockSource>> Disk::view(const std::string& snapshot_id) {
    if (snapshot_id.empty()) co_return active_;
    co_return co_await image_->snapshot(snapshot_id);
}

Task<std::shared_ptr<BlockSource>> Disk::bitmap_view(const std::string& name) {
    co_return co_await image_->bitmap(name);
}

Task<void> Disk::read(BlockSource& view, uint64_t offset, std::span<std::byte> buf) {
    if (is_active(view) && cache_) {
        co_await cache_->read(offset, buf);
        co_return;
    }
    // A bitmap's bits are set as writes reach the image: cached writes go there first.
    if (is_bitmap(view) && cache_ && !cache_->empty()) co_await cache_->write_back();
    co_await view.read(offset, buf);
}

Task<std::optional<uint64_t>> Disk::seek(BlockSource& view, uint64_t pos, bool want_data) {
    const uint64_t size = view.size();
    if (pos >= size) co_return std::nullopt;
    if ((is_active(view) || is_bitmap(view)) && cache_ && !cache_->empty()) co_await cache_->write_back();
    while (pos < size) {
        MapRun run = co_await view.map(pos);
        if (run.data == want_data) break;
        pos = std::max(run.end, pos + 1);
    }
    if (pos < size) co_return pos;
    if (want_data) co_return std::nullopt;
    co_return size;
}

Task<size_t> Disk::write(uint64_t offset, std::span<const std::byte> data) {
    check_writable();
    if (data.empty()) co_return 0;
    if (offset + data.size() > image_->size()) co_await resize(offset + data.size(), true);
    auto shared = co_await size_lock_.lock(0, 1, cache::RangeLock::Mode::shared);
    const uint64_t disk = image_->size();
    // Only a shrink that came in between leaves the write (partly) past the end.
    if (offset >= disk) co_return 0;
    const size_t n = static_cast<size_t>(std::min<uint64_t>(data.size(), disk - offset));
    ++changes_;
    co_await cache_->write(offset, data.first(n));
    co_return n;
}

Task<void> Disk::fill(Fill how, uint64_t offset, uint64_t length, bool grow) {
    check_writable();
    const uint64_t end = offset + length;
    if (grow && end > image_->size()) co_await resize(end, true);
    auto shared = co_await size_lock_.lock(0, 1, cache::RangeLock::Mode::shared);
    const uint64_t disk = image_->size();
    if (offset >= disk) co_return;
    const uint64_t n = std::min(end, disk) - offset;
    ++changes_;
    switch (how) {
    case Fill::punch_hole:
        co_await cache_->write_zeroes(offset, n, true);
        break;
    case Fill::zero:
        co_await cache_->write_zeroes(offset, n, false);
        break;
    case Fill::allocate:
        // A cached discard over the range must not free what is being reserved.
        co_await cache_->write_back();
        co_await image_->allocate(offset, n);
        break;
    }
}

Task<void> Disk::resize(uint64_t new_size, bool grow_only) {
    check_writable();
    if (new_size > std::numeric_limits<uint64_t>::max() - 511) fail(EFBIG, "disk size too large");
    new_size = (new_size + 511) / 512 * 512;
    auto exclusive = co_await size_lock_.lock(0, 1, cache::RangeLock::Mode::exclusive);
    const uint64_t old_size = image_->size();
    if (new_size == old_size || (grow_only && new_size < old_size)) co_return;
    if (new_size < old_size) {
        co_await cache_->write_back();
        cache_->truncate(new_size);
    }
    ++changes_;
    co_await image_->resize(new_size);
    if (on_resize_) on_resize_(image_->size());
}

Task<void> Disk::write_back() {
    if (cache_) co_await cache_->write_back();
}

Task<void> Disk::flush() {
    if (!cache_) co_return;
    const uint64_t changes = changes_;
    const uint64_t copied = image_->copy_stats().copied_bytes;
    co_await cache_->flush();  // write-back, then Image::flush: durable
    flushed_changes_ = std::max(flushed_changes_, changes);
    flushed_copied_ = std::max(flushed_copied_, copied);
}

bool Disk::changed_since_flush() const {
    // Copies made by copy-on-read change the image too (not what it reads as): flushed alike.
    return cache_ && (!cache_->empty() || changes_ != flushed_changes_ ||
                      image_->copy_stats().copied_bytes != flushed_copied_);
}

std::string Disk::lost_writes(const std::string& why) const {
    constexpr size_t kShown = 16;
    if (!cache_) return "no cached writes are lost: " + why;
    auto ranges = cache_->dirty_ranges(kShown + 1);
    std::string list;
    for (size_t i = 0; i < ranges.size() && i < kShown; ++i)
        list += (i ? ", " : "") + hex(ranges[i].first) + "+" + std::to_string(ranges[i].second);
    if (ranges.size() > kShown) list += ", and more";
    return std::to_string(cache_->dirty_bytes()) + " bytes of cached writes (guest ranges " + list +
           ") are lost: " + why;
}

Task<void> Disk::close() { co_await image_->close(); }

void Disk::check_writable() const {
    if (!cache_) fail(EROFS, image_->read_only_reason().empty() ? "opened read-only" : image_->read_only_reason());
}

}  // namespace qcowfs::qcow2
