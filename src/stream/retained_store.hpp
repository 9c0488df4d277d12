// Cluster-sized blobs kept for later: in memory up to a byte budget, beyond it in an unlinked spill file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace qcowfs::stream {

/// Holds blobs of exactly `blob_size` bytes under 64-bit keys. The first `memory_limit` bytes of
/// blobs live in memory; every further blob goes to a spill file created (and unlinked at once) in
/// `spill_dir` on first need. Spill slots are reused when blobs are taken, so the spill file never
/// holds more than the largest number of blobs alive at one time. Single-threaded.
class RetainedStore {
public:
    RetainedStore(size_t blob_size, uint64_t memory_limit, std::string spill_dir);
    ~RetainedStore();
    RetainedStore(const RetainedStore&) = delete;
    RetainedStore& operator=(const RetainedStore&) = delete;

    /// Stores a copy of `data` (blob_size bytes) under a key not yet present.
    /// Throws std::system_error when the spill file cannot be created or written (ENOSPC, ...).
    void put(uint64_t key, std::span<const std::byte> data);
    bool contains(uint64_t key) const { return blobs_.count(key) != 0; }
    /// Copies out.size() bytes from offset `offset` of the blob. The key must be present.
    void read(uint64_t key, size_t offset, std::span<std::byte> out) const;
    /// Copies the whole blob into `out` (blob_size bytes) and forgets it.
    void take(uint64_t key, std::span<std::byte> out);
    void erase(uint64_t key);
    /// Forgets every blob whose key satisfies `pred`.
    template <class Pred>
    void erase_if(Pred pred) {
        std::vector<uint64_t> keys;
        for (auto& [k, _] : blobs_)
            if (pred(k)) keys.push_back(k);
        for (uint64_t k : keys) erase(k);
    }

    size_t count() const { return blobs_.size(); }
    uint64_t memory_bytes() const { return memory_used_; }
    /// Most bytes held in memory at one time.
    uint64_t peak_memory_bytes() const { return peak_memory_; }
    uint64_t spilled_bytes() const { return spilled_ * blob_size_; }
    /// Largest spill file size reached, in bytes.
    uint64_t spill_file_bytes() const { return next_slot_ * blob_size_; }

private:
    struct Blob {
        std::unique_ptr<std::byte[]> memory;  // null when spilled
        uint64_t slot = 0;                    // spill slot when memory is null
    };
    void open_spill();

    size_t blob_size_;
    uint64_t memory_limit_;
    std::string spill_dir_;
    std::unordered_map<uint64_t, Blob> blobs_;
    uint64_t memory_used_ = 0;
    uint64_t peak_memory_ = 0;
    uint64_t spilled_ = 0;
    int spill_fd_ = -1;
    std::vector<uint64_t> free_slots_;
    uint64_t next_slot_ = 0;
};

}  // namespace qcowfs::stream
