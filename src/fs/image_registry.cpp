// Open images by host identity, shared by all FUSE handles, and the once-per-reason error log.
#include <boost/asio/post.hpp>
#include <chrono>

#include "qcowfs/fs/filesystem.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "qcowfs/util/log.hpp"

namespace qcowfs::fs {

std::shared_ptr<ImageSlot> ImageRegistry::acquire(uint64_t dev, uint64_t ino, const std::string& path) {
    std::lock_guard lock(mutex_);
    auto& slot = slots_[{dev, ino}];
    if (!slot) slot = std::make_shared<ImageSlot>(io_, path);
    ++slot->handles;
    return slot;
}

void ImageRegistry::release(const std::shared_ptr<ImageSlot>& slot) {
    {
        std::lock_guard lock(mutex_);
        if (--slot->handles > 0) return;
        for (auto it = slots_.begin(); it != slots_.end(); ++it) {
            if (it->second == slot) {
                slots_.erase(it);
                break;
            }
        }
    }
    // Close the image on its strand, after any coroutine still running there.
    asio::post(slot->strand, [slot] { slot->image.reset(); });
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
