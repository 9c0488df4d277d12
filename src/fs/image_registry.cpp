// Open images by host identity, shared by all FUSE handles, and the once-per-reason error log.
#include <cctype>
#include <chrono>

#include "qcowfs/fs/filesystem.hpp"
#include "qcowfs/qcow2/disk.hpp"
#include "qcowfs/util/log.hpp"

namespace qcowfs::fs {

ImageSlot::ImageSlot(const Workers& workers, uint64_t d, uint64_t i, std::string p, bool follow)
    : workers(workers), dev(d), ino(i), path(std::move(p)), follow_final(follow) {}

// Out of line: qcow2::Disk is complete here.
ImageSlot::~ImageSlot() = default;

std::shared_ptr<ImageSlot> ImageRegistry::acquire(uint64_t dev, uint64_t ino, const std::string& path,
                                                  bool follow_final) {
    std::lock_guard lock(mutex_);
    auto& slot = slots_[{dev, ino}];
    if (!slot) slot = std::make_shared<ImageSlot>(workers_, dev, ino, path, follow_final);
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
    corrupt_.erase(slot->path);  // a later open of the image reports its errors afresh
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

namespace {

/// The kind of a reason: its text with every run of digits (and hex digits after one) as '#',
/// so that "read at 4096 failed" and "read at 8192 failed" are one kind.
std::string reason_kind(const std::string& reason) {
    std::string out;
    out.reserve(reason.size());
    for (size_t i = 0; i < reason.size();) {
        if (std::isdigit(static_cast<unsigned char>(reason[i]))) {
            while (i < reason.size() && (std::isxdigit(static_cast<unsigned char>(reason[i])) || reason[i] == 'x')) ++i;
            out += '#';
        } else {
            out += reason[i++];
        }
    }
    return out;
}

}  // namespace

void ImageRegistry::report(const std::string& path, const std::string& reason, Severity severity) {
    // One line per broken image and kind of failure, not one per failing request: a damaged image
    // read by a copy tool would otherwise fill the log. A reminder follows if it keeps failing.
    auto now = std::chrono::steady_clock::now();
    size_t suppressed = 0;
    {
        std::lock_guard lock(mutex_);
        if (reported_.size() > 10000) reported_.clear();
        if (corrupt_.count(path)) {
            ++reported_[path + "\ncorrupt"].suppressed;  // a consequence of the corruption
            return;
        }
        auto [it, first] = reported_.try_emplace(path + '\n' + reason_kind(reason), Reported{now, 0});
        if (!first) {
            if (now - it->second.when < std::chrono::minutes(10)) {
                ++it->second.suppressed;
                return;
            }
            suppressed = it->second.suppressed;
            it->second = Reported{now, 0};
        }
    }
    std::string line = path + ": " + reason +
                       (suppressed ? " (" + std::to_string(suppressed) + " more like it in the last 10 minutes)" : "");
    if (severity == Severity::notice)
        log::info(line);
    else
        log::error(line);
}

void ImageRegistry::report_loss(const std::string& path, const std::string& what) {
    log::error(path + ": DATA LOST: " + what);
}

void ImageRegistry::report_corrupt(const std::string& path, const std::string& reason) {
    {
        std::lock_guard lock(mutex_);
        if (corrupt_.count(path)) return;
        corrupt_.insert(path);
        reported_[path + "\ncorrupt"] = Reported{std::chrono::steady_clock::now(), 0};
    }
    log::error(path + ": marked corrupt: " + reason);
}

}  // namespace qcowfs::fs
