// RetainedStore: a memory budget in front of a reusable-slot spill file.
#include "stream/retained_store.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "qcowfs/format/error.hpp"
#include "stream/sysio.hpp"

namespace qcowfs::stream {

RetainedStore::RetainedStore(size_t blob_size, uint64_t memory_limit, std::string spill_dir)
    : blob_size_(blob_size), memory_limit_(memory_limit), spill_dir_(std::move(spill_dir)) {}

RetainedStore::~RetainedStore() {
    if (spill_fd_ >= 0) ::close(spill_fd_);
}

void RetainedStore::open_spill() {
    spill_fd_ = open_temp_file(spill_dir_, "spill");
}

void RetainedStore::put(uint64_t key, std::span<const std::byte> data) {
    Blob b;
    if (memory_used_ + blob_size_ <= memory_limit_) {
        b.memory = std::make_unique_for_overwrite<std::byte[]>(blob_size_);
        std::memcpy(b.memory.get(), data.data(), blob_size_);
        memory_used_ += blob_size_;
        peak_memory_ = std::max(peak_memory_, memory_used_);
    } else {
        if (spill_fd_ < 0) open_spill();
        if (!free_slots_.empty()) {
            b.slot = free_slots_.back();
            free_slots_.pop_back();
        } else {
            b.slot = next_slot_++;
        }
        pwrite_all(spill_fd_, data.first(blob_size_), b.slot * blob_size_, "the spill file");
        ++spilled_;
    }
    blobs_.emplace(key, std::move(b));
}

void RetainedStore::read(uint64_t key, size_t offset, std::span<std::byte> out) const {
    const Blob& b = blobs_.at(key);
    if (b.memory)
        std::memcpy(out.data(), b.memory.get() + offset, out.size());
    else
        pread_all(spill_fd_, out, b.slot * blob_size_ + offset, "the spill file");
}

void RetainedStore::take(uint64_t key, std::span<std::byte> out) {
    read(key, 0, out.first(blob_size_));
    erase(key);
}

void RetainedStore::erase(uint64_t key) {
    auto it = blobs_.find(key);
    if (it == blobs_.end()) return;
    if (it->second.memory) {
        memory_used_ -= blob_size_;
    } else {
        free_slots_.push_back(it->second.slot);
        --spilled_;
    }
    blobs_.erase(it);
}

}  // namespace qcowfs::stream
