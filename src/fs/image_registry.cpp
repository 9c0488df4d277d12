// Open images by host identity, shared by all FUSE handles, and the once-per-reason error log.
#include <chrono>

#include "qcowfs/cache/data_cache.hpp"
#include "qcowfs/fs/filesystem.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "qcowfs/util/log.hpp"

namespace qcowfs::fs {

// Out of line: DataCache and View are complete here. The cache goes before the view it writes to.
ImageSlot::~ImageSlot() {
    cache.reset();
    active.reset();
}

std::shared_ptr<ImageSlot> ImageRegistry::acquire(uint64_t dev, uint64_t ino, const std::string& path,
                                                  bool follow_final) {
    std::lock_guard lock(mutex_);
    auto& slot = slots_[{dev, ino}];
    if (!slot) slot = std::make_shared<ImageSlot>(io_, dev, ino, path, follow_final);
    ++slot->handles;
    return slot;
}

bool ImageRegistry::release(const std::shared_ptr<ImageSlot>& slot) {
    std::lock_guard lock(mutex_);
    return --slot->handles == 0;
}

bool ImageRegistry::remove_if_unused(const std::shared_ptr<ImageSlot>& slot) {
    std::lock_guard lock(mutex_);
    if (slot->handles > 0) return false;
    for (auto it = slots_.begin(); it != slots_.end(); ++it) {
        if (it->second == slot) {
            slots_.erase(it);
            break;
        }
    }
    return true;
}

void ImageRegistry::closed(const ImageSlot& slot, uint64_t size) {
    auto now = std::chrono::steady_clock::now();
    std::lock_guard lock(mutex_);
    std::erase_if(closed_, [&](const auto& entry) { return now - entry.second.when > std::chrono::minutes(1); });
    closed_[{slot.dev, slot.ino}] = Closed{now, size};
}

std::optional<uint64_t> ImageRegistry::live_size(uint64_t dev, uint64_t ino,
                                                 std::chrono::steady_clock::time_point scanned) const {
    std::lock_guard lock(mutex_);
    if (auto it = slots_.find({dev, ino}); it != slots_.end()) {
        uint64_t size = it->second->live_size;
        if (size != ImageSlot::kUnknownSize) return size;
    }
    if (auto it = closed_.find({dev, ino}); it != closed_.end() && it->second.when >= scanned) return it->second.size;
    return std::nullopt;
}

size_t ImageRegistry::handles(const std::shared_ptr<ImageSlot>& slot) const {
    std::lock_guard lock(mutex_);
    return slot->handles;
}

std::shared_ptr<ImageSlot> ImageRegistry::find(uint64_t dev, uint64_t ino) const {
    std::lock_guard lock(mutex_);
    auto it = slots_.find({dev, ino});
    return it == slots_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<ImageSlot>> ImageRegistry::all() const {
    std::lock_guard lock(mutex_);
    std::vector<std::shared_ptr<ImageSlot>> out;
    out.reserve(slots_.size());
    for (const auto& [id, slot] : slots_) out.push_back(slot);
    return out;
}

void ImageRegistry::report(const std::string& path, const std::string& reason) {
    // One line per broken image, not one per failing request: a damaged image read by a copy
    // tool would otherwise fill the log. A reminder follows if it keeps failing for long.
    auto now = std::chrono::steady_clock::now();
    size_t suppressed = 0;
    {
        std::lock_guard lock(mutex_);
        if (reported_.size() > 10000) reported_.clear();
        auto [it, first] = reported_.try_emplace(path, Reported{now, 0});
        if (!first) {
            if (now - it->second.when < std::chrono::minutes(10)) {
                ++it->second.suppressed;
                return;
            }
            suppressed = it->second.suppressed;
            it->second = Reported{now, 0};
        }
    }
    log::error(path + ": " + reason +
               (suppressed ? " (" + std::to_string(suppressed) + " more errors in the last 10 minutes)" : ""));
}

size_t ImageRegistry::open_images() const {
    std::lock_guard lock(mutex_);
    return slots_.size();
}

}  // namespace qcowfs::fs
