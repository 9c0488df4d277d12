// Open images by host identity, shared by all FUSE handles, and the once-per-reason error log.
#include <boost/asio/post.hpp>

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
    {
        std::lock_guard lock(mutex_);
        if (reported_.size() > 10000) reported_.clear();
        if (!reported_.insert(path + '\n' + reason).second) return;
    }
    log::error(path + ": " + reason);
}

size_t ImageRegistry::open_images() const {
    std::lock_guard lock(mutex_);
    return slots_.size();
}

}  // namespace qcowfs::fs
