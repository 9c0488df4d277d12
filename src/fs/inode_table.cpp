// FUSE inode numbers for view nodes, with kernel lookup counts.
#include "qcowfs/fs/filesystem.hpp"

#include <fuse_lowlevel.h>

namespace qcowfs::fs {

InodeTable::InodeTable(NodeKey root) {
    by_ino_[FUSE_ROOT_ID] = Inode{root, 1, {}};
    by_key_[root] = FUSE_ROOT_ID;
}

uint64_t InodeTable::ref(const NodeKey& key, const struct stat& attr) {
    std::lock_guard lock(mutex_);
    auto [it, inserted] = by_key_.try_emplace(key, next_);
    if (inserted) by_ino_[next_++] = Inode{key, 0, {}};
    Inode& inode = by_ino_[it->second];
    inode.attr = attr;
    inode.attr.st_ino = it->second;
    ++inode.nlookup;
    return it->second;
}

void InodeTable::update(const NodeKey& key, const struct stat& attr) {
    std::lock_guard lock(mutex_);
    auto it = by_key_.find(key);
    if (it == by_key_.end()) return;
    Inode& inode = by_ino_[it->second];
    inode.attr = attr;
    inode.attr.st_ino = it->second;
}

uint64_t InodeTable::find(const NodeKey& key) const {
    std::lock_guard lock(mutex_);
    auto it = by_key_.find(key);
    return it == by_key_.end() ? 0 : it->second;
}

bool InodeTable::get(uint64_t ino, NodeKey& key, struct stat& attr) const {
    std::lock_guard lock(mutex_);
    auto it = by_ino_.find(ino);
    if (it == by_ino_.end()) return false;
    key = it->second.key;
    attr = it->second.attr;
    return true;
}

void InodeTable::forget(uint64_t ino, uint64_t n) {
    std::lock_guard lock(mutex_);
    auto it = by_ino_.find(ino);
    if (it == by_ino_.end() || ino == FUSE_ROOT_ID) return;
    it->second.nlookup = n >= it->second.nlookup ? 0 : it->second.nlookup - n;
    if (it->second.nlookup == 0) {
        by_key_.erase(it->second.key);
        by_ino_.erase(it);
    }
}

size_t InodeTable::size() const {
    std::lock_guard lock(mutex_);
    return by_ino_.size();
}

}  // namespace qcowfs::fs
