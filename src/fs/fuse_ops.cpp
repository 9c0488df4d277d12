// FUSE low-level request handlers: every request is answered exactly once, errors become errno.
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "qcowfs/cache/data_cache.hpp"
#include "qcowfs/format/error.hpp"
#include "qcowfs/fs/filesystem.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "qcowfs/util/log.hpp"

namespace qcowfs::fs {
namespace {

constexpr double kEntryTimeout = 0.3;  // seconds: keeps added/removed images visible within 1 s
constexpr double kAttrTimeout = 0.3;

constexpr mode_t kWriteBits = S_IWUSR | S_IWGRP | S_IWOTH;

/// State behind fuse_file_info::fh for an open exposed file.
struct OpenFile {
    std::shared_ptr<ImageSlot> slot;
    std::shared_ptr<qcow2::BlockSource> view;
    bool active = false;    // the active disk (reads go through slot->cache when there is one)
    bool writable = false;  // opened for writing (then slot->cache exists)
};

/// Replies to `req` with the error `e` carries, after logging it (rate-limited per image and
/// reason). An image replaced or removed since the scan (ESTALE, ENOENT: a rename raced the open)
/// is not an error of the image: ENOENT, nothing logged.
void reply_error(fuse_req_t req, ImageRegistry& images, const std::string& path, const std::system_error& e) {
    int code = errno_of(e);
    if (code == ESTALE || code == ENOENT) return void(fuse_reply_err(req, ENOENT));
    // Refusals (QEMU holds the image, the user may not, the image may not be written) are
    // expected answers: notices, which never mute the image's real errors.
    const bool refusal = code == EACCES || code == EBUSY || code == EROFS || code == EPERM;
    images.report(path, describe(e), refusal ? ImageRegistry::Severity::notice : ImageRegistry::Severity::error);
    fuse_reply_err(req, code);
}

/// State behind fuse_file_info::fh for an open directory: its entries when opened.
struct DirEntry {
    std::string name;
    uint64_t ino;
    mode_t mode;
};
struct OpenDir {
    std::vector<DirEntry> entries;
};

Filesystem* fs_of(fuse_req_t req) { return static_cast<Filesystem*>(fuse_req_userdata(req)); }

/// The user behind `req`: uid, gid and supplementary groups (read by libfuse from /proc; only the
/// primary group when the process is gone).
io::Credentials credentials_of(fuse_req_t req) {
    const fuse_ctx* ctx = fuse_req_ctx(req);
    io::Credentials user{ctx->uid, ctx->gid, {}};
    if (!io::needs_access_check(user)) return user;
    std::vector<gid_t> groups(64);
    for (;;) {
        int n = fuse_req_getgroups(req, static_cast<int>(groups.size()), groups.data());
        if (n < 0) break;
        if (static_cast<size_t>(n) <= groups.size()) {
            groups.resize(static_cast<size_t>(n));
            user.groups = std::move(groups);
            break;
        }
        groups.resize(static_cast<size_t>(n));
    }
    return user;
}

/// Logs a request when -d is on.
void trace(const char* op, fuse_ino_t ino, const std::string& more = {}) {
    if (log::debug_enabled()) log::debug(std::string(op) + " ino=" + std::to_string(ino) + more);
}


}  // namespace

struct stat Filesystem::attr_of(const Tree& tree, const Node& node) const {
    struct stat st = node.attr;
    if (options_.read_only) st.st_mode &= ~kWriteBits;
    // The scanned size lags a resize by up to a scan interval; qcowfs knows the size now.
    if (node.key.kind == NodeKey::Kind::image) {
        if (auto size = images_.live_size(node.key.dev, node.key.ino, tree.scanned_at()))
            st.st_size = static_cast<off_t>(*size);
    }
    return st;
}

std::string Filesystem::write_refusal(const Node& node) const {
    if (options_.read_only) return "the file system is mounted read-only";
    if (node.key.kind == NodeKey::Kind::snapshot) return "snapshots are read-only";
    if (!node.image) return "not an image";
    if (!node.image->read_only_reason.empty()) return node.image->read_only_reason;
    if (auto slot = images_.find(node.key.dev, node.key.ino); slot && slot->corrupt) return "the image is marked corrupt";
    return {};
}

struct Filesystem::Handlers {
    /// The key and last attributes of `ino`; replies ENOENT and returns false if it is unknown.
    static bool resolve(fuse_req_t req, Filesystem& fs, fuse_ino_t ino, NodeKey& key, struct stat& st) {
        if (fs.inodes_->get(ino, key, st)) return true;
        fuse_reply_err(req, ENOENT);
        return false;
    }

    static void init(void*, fuse_conn_info* conn) {
        conn->want |= FUSE_CAP_ASYNC_READ;
        // O_TRUNC arrives as an open flag, so open() can refuse it with EROFS whatever the access
        // mode; no write-back page cache: every write reaches the image's DataCache.
        if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC) conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
        conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
        conn->max_write = 1u << 20;  // also raises max_pages, so reads of up to 1 MiB arrive whole
        conn->max_readahead = 1u << 20;
        // Readahead and asynchronous direct I/O are "background" requests, 12 at most by
        // default: too few to keep io_uring busy at queue depths of 16 and more.
        conn->max_background = 64;
        conn->congestion_threshold = 48;
    }

    static void lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
        Filesystem& fs = *fs_of(req);
        trace("lookup", parent, std::string(" name=") + name);
        NodeKey parent_key;
        struct stat ignored;
        if (!resolve(req, fs, parent, parent_key, ignored)) return;
        auto tree = fs.tree();
        const Node* node = tree->child(parent_key, name);
        if (!node) return void(fuse_reply_err(req, ENOENT));
        fuse_entry_param e{};
        e.attr = fs.attr_of(*tree, *node);
        e.ino = fs.inodes_->ref(node->key, e.attr);
        e.attr.st_ino = e.ino;
        e.attr_timeout = kAttrTimeout;
        e.entry_timeout = kEntryTimeout;
        fuse_reply_entry(req, &e);
    }

    static void forget(fuse_req_t req, fuse_ino_t ino, uint64_t n) {
        trace("forget", ino, " n=" + std::to_string(n));
        fs_of(req)->inodes_->forget(ino, n);
        fuse_reply_none(req);
    }

    static void forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
        log::debug("forget_multi count=" + std::to_string(count));
        for (size_t i = 0; i < count; ++i) fs_of(req)->inodes_->forget(forgets[i].ino, forgets[i].nlookup);
        fuse_reply_none(req);
    }

    static void getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
        Filesystem& fs = *fs_of(req);
        trace("getattr", ino);
        NodeKey key;
        struct stat st;
        if (!resolve(req, fs, ino, key, st)) return;
        auto tree = fs.tree();
        if (const Node* node = tree->find(key)) {
            st = fs.attr_of(*tree, *node);
            fs.inodes_->update(key, st);
        } else if (ino == FUSE_ROOT_ID) {
            return void(fuse_reply_err(req, ENOENT));
        }
        // A node gone from the view (image deleted while open) keeps its last attributes.
        st.st_ino = ino;
        fuse_reply_attr(req, &st, kAttrTimeout);
    }

    static void opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
        Filesystem& fs = *fs_of(req);
        trace("opendir", ino);
        NodeKey key;
        struct stat st;
        if (!resolve(req, fs, ino, key, st)) return;
        auto tree = fs.tree();
        const Node* dir = tree->find(key);
        if (!dir) return void(fuse_reply_err(req, ENOENT));
        if (key.kind != NodeKey::Kind::directory) return void(fuse_reply_err(req, ENOTDIR));
        auto od = std::make_unique<OpenDir>();
        od->entries.push_back({".", ino, S_IFDIR});
        od->entries.push_back({"..", FUSE_ROOT_ID, S_IFDIR});
        for (const auto& [name, child_key] : dir->children) {
            const Node* child = tree->find(child_key);
            if (!child) continue;
            // readdir creates no inodes (no forget would ever free them): d_ino is the FUSE inode
            // when the kernel holds one, else the host's.
            uint64_t child_ino = fs.inodes_->find(child_key);
            if (!child_ino) {
                child_ino = child_key.ino ^ (std::hash<std::string>{}(child_key.snapshot_id) << 1);
                if (child_ino == 0) child_ino = 1;
            }
            od->entries.push_back({name, child_ino, child->attr.st_mode});
        }
        fi->fh = reinterpret_cast<uint64_t>(od.release());
        if (fuse_reply_open(req, fi) != 0) delete reinterpret_cast<OpenDir*>(fi->fh);
    }

    static void readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
        trace("readdir", ino, " off=" + std::to_string(off));
        auto* od = reinterpret_cast<OpenDir*>(fi->fh);
        std::vector<char> buf(size);
        size_t used = 0;
        for (size_t i = static_cast<size_t>(off); i < od->entries.size(); ++i) {
            struct stat st{};
            st.st_ino = od->entries[i].ino;
            st.st_mode = od->entries[i].mode;
            size_t n = fuse_add_direntry(req, buf.data() + used, size - used, od->entries[i].name.c_str(), &st,
                                         static_cast<off_t>(i + 1));
            if (n > size - used) break;
            used += n;
        }
        fuse_reply_buf(req, buf.data(), used);
    }

    static void releasedir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
        trace("releasedir", ino);
        delete reinterpret_cast<OpenDir*>(fi->fh);
        fuse_reply_err(req, 0);
    }

    static void open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
        Filesystem& fs = *fs_of(req);
        trace("open", ino, " flags=" + std::to_string(fi->flags));
        NodeKey key;
        struct stat st;
        if (!resolve(req, fs, ino, key, st)) return;
        if (key.kind == NodeKey::Kind::directory) return void(fuse_reply_err(req, EISDIR));
        auto tree = fs.tree();
        const Node* node = tree->find(key);
        if (!node || !node->image) return void(fuse_reply_err(req, ENOENT));
        // O_TRUNC arrives here (FUSE_CAP_ATOMIC_O_TRUNC), with any access mode: the truncation is a
        // write, refused like one, and done below once the image is open.
        const bool for_writing = (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC);
        if (for_writing) {
            std::string why = fs.write_refusal(*node);
            if (!why.empty()) {
                trace("open", ino, ": EROFS, " + why);
                return void(fuse_reply_err(req, EROFS));
            }
        }
        // Open the Image writable whenever the image may be written, whatever this handle wants:
        // it is shared by every handle, and a later one may write.
        const bool writable_image = !fs.options_.read_only && node->image->read_only_reason.empty();
        auto slot = fs.images_.acquire(key.dev, key.ino, node->image->path, node->image->path_is_symlink);
        fuse_file_info info = *fi;  // *fi does not outlive this call
        std::string snapshot_id = key.snapshot_id;
        io::Credentials user = credentials_of(req);
        fs.spawn(slot->strand, [&fs, req, slot, info, snapshot_id, for_writing, writable_image,
                                user]() mutable -> Task<void> {
            try {
                co_await fs.open_for(slot, writable_image, user, for_writing);
                if (for_writing && (!slot->cache || slot->corrupt)) {
                    // Opened read-only after all (no write permission on the host file, or the
                    // image itself refuses writes): EROFS is an answer, not an image error.
                    trace("open", 0, " " + slot->path + ": EROFS, " +
                                         (slot->corrupt ? std::string("marked corrupt")
                                                        : slot->image->read_only_reason()));
                    fs.release_slot(slot);
                    fuse_reply_err(req, EROFS);
                    co_return;
                }
                if ((info.flags & O_TRUNC) && snapshot_id.empty()) {
                    int refused = 0;
                    try {
                        co_await resize(*slot, 0);
                    } catch (const std::system_error& e) {
                        if (errno_of(e) != ENOTSUP) throw;
                        refused = ENOTSUP;  // an image with snapshots cannot shrink: an answer
                        fs.images_.report(slot->path, "O_TRUNC refused: " + reason_of(e),
                                          ImageRegistry::Severity::notice);
                    }
                    if (refused) {
                        fs.release_slot(slot);
                        fuse_reply_err(req, refused);
                        co_return;
                    }
                }
                auto of = std::make_unique<OpenFile>();
                of->slot = slot;
                of->active = snapshot_id.empty();
                of->writable = for_writing;
                if (of->active)
                    of->view = slot->image->active();
                else
                    of->view = co_await slot->image->snapshot(snapshot_id);
                info.fh = reinterpret_cast<uint64_t>(of.get());
                info.keep_cache = 0;
                if (fuse_reply_open(req, &info) == 0) of.release();
                else fs.release_slot(slot);
            } catch (const std::system_error& e) {
                fs.release_slot(slot);
                reply_error(req, fs.images_, slot->path, e);
            } catch (const std::exception& e) {
                fs.images_.report(slot->path, e.what());
                fs.release_slot(slot);
                fuse_reply_err(req, EIO);
            }
        });
    }

    static void read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
        Filesystem& fs = *fs_of(req);
        trace("read", ino, " off=" + std::to_string(off) + " size=" + std::to_string(size));
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        fs.spawn(of->slot->strand, [&fs, req, of, size, off]() -> Task<void> {
            try {
                uint64_t vsize = of->view->size();
                uint64_t offset = static_cast<uint64_t>(off);
                if (offset >= vsize || size == 0) {
                    fuse_reply_buf(req, nullptr, 0);
                    co_return;
                }
                size_t n = static_cast<size_t>(std::min<uint64_t>(size, vsize - offset));
                std::unique_ptr<std::byte[]> buf(new std::byte[n]);
                std::span<std::byte> out(buf.get(), n);
                // The active disk of a writable image reads through its cache: cached writes show.
                if (of->active && of->slot->cache)
                    co_await of->slot->cache->read(offset, out);
                else
                    co_await of->view->read(offset, out);
                fuse_reply_buf(req, reinterpret_cast<const char*>(buf.get()), n);
            } catch (const std::system_error& e) {
                fs.images_.report(of->slot->path, describe(e));
                fuse_reply_err(req, errno_of(e));
            } catch (const std::exception& e) {
                fs.images_.report(of->slot->path, e.what());
                fuse_reply_err(req, EIO);
            }
        });
    }

    /// Runs `body` on the image strand of `fi`'s file if it was opened for writing, replying
    /// EBADF otherwise; the body's std::system_error becomes the reply (logged once per image).
    template <class Body>
    static void spawn_write(fuse_req_t req, fuse_file_info* fi, Body body) {
        Filesystem& fs = *fs_of(req);
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        if (!of->writable || !of->slot->cache) return void(fuse_reply_err(req, EBADF));
        fs.spawn(of->slot->strand, [&fs, req, of, body = std::move(body)]() mutable -> Task<void> {
            try {
                co_await body(*of->slot);
            } catch (const std::system_error& e) {
                reply_error(req, fs.images_, of->slot->path, e);
            } catch (const std::exception& e) {
                fs.images_.report(of->slot->path, e.what());
                fuse_reply_err(req, EIO);
            }
        });
    }

    /// Changes the disk's size to `new_size` rounded up to a multiple of 512 bytes (QEMU reads a
    /// qcow2 size in whole sectors). Cached data is written back before a shrink (so a refused
    /// shrink loses nothing) and changes past the new end are dropped; then the image is resized.
    /// `grow_only`: leaves a disk that is already at least that big alone. On the image's strand.
    static Task<void> resize(ImageSlot& slot, uint64_t new_size, bool grow_only = false) {
        if (new_size > std::numeric_limits<uint64_t>::max() - 511) fail(EFBIG, "disk size too large");
        new_size = (new_size + 511) / 512 * 512;
        auto exclusive = co_await slot.size_lock.lock(0, 1, cache::RangeLock::Mode::exclusive);
        const uint64_t old_size = slot.image->size();
        if (new_size == old_size || (grow_only && new_size < old_size)) co_return;
        if (new_size < old_size) {
            co_await slot.cache->write_back();
            slot.cache->truncate(new_size);
        }
        ++slot.changes;
        co_await slot.image->resize(new_size);
        slot.live_size = slot.image->size();
    }

    static void write(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off, fuse_file_info* fi) {
        trace("write", ino, " off=" + std::to_string(off) + " size=" + std::to_string(size));
        // libfuse owns `buf` only until this callback returns.
        std::vector<std::byte> data(reinterpret_cast<const std::byte*>(buf), reinterpret_cast<const std::byte*>(buf) + size);
        spawn_write(req, fi, [req, data = std::move(data), off](ImageSlot& slot) -> Task<void> {
            if (off < 0) co_return void(fuse_reply_err(req, EINVAL));
            if (data.empty()) co_return void(fuse_reply_write(req, 0));
            const uint64_t offset = static_cast<uint64_t>(off), end = offset + data.size();
            // Like a regular file (and as cp onto NAME.raw needs), a write past the end grows the
            // disk first: to the end of the write, rounded up to a whole sector.
            if (end > slot.image->size()) co_await resize(slot, end, true);
            auto shared = co_await slot.size_lock.lock(0, 1, cache::RangeLock::Mode::shared);
            const uint64_t disk = slot.image->size();
            // Only a shrink that came in between leaves the write (partly) past the end.
            if (offset >= disk) co_return void(fuse_reply_err(req, ENOSPC));
            size_t n = static_cast<size_t>(std::min<uint64_t>(data.size(), disk - offset));
            ++slot.changes;
            co_await slot.cache->write(offset, std::span<const std::byte>(data).first(n));
            fuse_reply_write(req, n);
        });
    }

    static void flush(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
        trace("flush", ino);
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        if (!of->writable) return void(fuse_reply_err(req, 0));
        // close(2): write the cached data back so that errors reach the closing program.
        spawn_write(req, fi, [req](ImageSlot& slot) -> Task<void> {
            co_await slot.cache->write_back();
            fuse_reply_err(req, 0);
        });
    }

    static void fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi) {
        trace("fsync", ino, " datasync=" + std::to_string(datasync));
        Filesystem& fs = *fs_of(req);
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        if (!of->active) return void(fuse_reply_err(req, 0));  // snapshots never change
        // Any handle of the active disk may sync it (fsync on an O_RDONLY descriptor is allowed).
        fs.spawn(of->slot->strand, [&fs, req, of]() -> Task<void> {
            ImageSlot& slot = *of->slot;
            try {
                if (slot.cache) {
                    uint64_t changes = slot.changes;
                    co_await slot.cache->flush();  // write-back, then Image::flush: durable
                    slot.flushed_changes = std::max(slot.flushed_changes, changes);
                }
                fuse_reply_err(req, 0);
            } catch (const std::system_error& e) {
                reply_error(req, fs.images_, slot.path, e);
            } catch (const std::exception& e) {
                fs.images_.report(slot.path, e.what());
                fuse_reply_err(req, EIO);
            }
        });
    }

    static void fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t length, fuse_file_info* fi) {
        trace("fallocate", ino, " mode=" + std::to_string(mode) + " off=" + std::to_string(off) +
                                    " len=" + std::to_string(length));
        if (off < 0 || length <= 0 || off > std::numeric_limits<off_t>::max() - length)
            return void(fuse_reply_err(req, EINVAL));
        const bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
        const int op = mode & ~FALLOC_FL_KEEP_SIZE;
        if (op != 0 && op != FALLOC_FL_ZERO_RANGE && !(op == FALLOC_FL_PUNCH_HOLE && keep_size))
            return void(fuse_reply_err(req, EOPNOTSUPP));
        spawn_write(req, fi, [req, op, keep_size, off, length](ImageSlot& slot) -> Task<void> {
            const uint64_t begin = static_cast<uint64_t>(off), end = begin + static_cast<uint64_t>(length);
            // Without KEEP_SIZE a range past the end grows the disk first (never PUNCH_HOLE).
            if (!keep_size && end > slot.image->size()) co_await resize(slot, end, true);
            auto shared = co_await slot.size_lock.lock(0, 1, cache::RangeLock::Mode::shared);
            const uint64_t disk = slot.image->size();
            if (begin < disk) {
                const uint64_t n = std::min(end, disk) - begin;
                ++slot.changes;
                if (op == FALLOC_FL_PUNCH_HOLE) {
                    co_await slot.cache->write_zeroes(begin, n, true);
                } else if (op == FALLOC_FL_ZERO_RANGE) {
                    co_await slot.cache->write_zeroes(begin, n, false);
                } else {
                    // A cached discard over the range must not free what is being reserved.
                    co_await slot.cache->write_back();
                    co_await slot.image->allocate(begin, n);
                }
            }
            fuse_reply_err(req, 0);
        });
    }

    /// Attributes after a setattr: the node's, with owner, mode and times fresh from the host
    /// file (if it is still the scanned one), and the live size.
    static struct stat fresh_attr(Filesystem& fs, const Tree& tree, const Node& node, fuse_ino_t ino) {
        struct stat st = fs.attr_of(tree, node);
        if (auto fresh = io::stat_host_file(fs.policy_, host_file_of(node))) {
            const struct stat& host = *fresh;
            mode_t perm = host.st_mode & 0777;
            if (fs.options_.read_only || !node.image->read_only_reason.empty()) perm &= ~kWriteBits;
            st.st_mode = (st.st_mode & S_IFMT) | perm;
            st.st_uid = host.st_uid;
            st.st_gid = host.st_gid;
            st.st_atim = host.st_atim;
            st.st_mtim = host.st_mtim;
            st.st_ctim = host.st_ctim;
        }
        st.st_ino = ino;
        fs.inodes_->update(node.key, st);
        return st;
    }

    static void setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info* fi) {
        Filesystem& fs = *fs_of(req);
        trace("setattr", ino, " to_set=" + std::to_string(to_set));
        NodeKey key;
        struct stat st;
        if (!resolve(req, fs, ino, key, st)) return;
        auto tree = fs.tree();
        const Node* node = tree->find(key);
        if (!node) return void(fuse_reply_err(req, ENOENT));
        if (fs.options_.read_only || key.kind != NodeKey::Kind::image) return void(fuse_reply_err(req, EROFS));
        if (to_set & FUSE_SET_ATTR_SIZE) {
            if (attr->st_size < 0) return void(fuse_reply_err(req, EINVAL));
            std::string why = fs.write_refusal(*node);
            if (!why.empty()) {
                trace("setattr", ino, ": EROFS, " + why);
                return void(fuse_reply_err(req, EROFS));
            }
        }
        // Owner, mode and times belong to the host image file: changed on the scanned file itself
        // (never on whatever its path names now), with the requesting user's rights.
        const io::Credentials user = credentials_of(req);
        std::optional<mode_t> mode;
        if (to_set & FUSE_SET_ATTR_MODE) mode = attr->st_mode & 07777;
        uid_t uid = (to_set & FUSE_SET_ATTR_UID) ? attr->st_uid : static_cast<uid_t>(-1);
        gid_t gid = (to_set & FUSE_SET_ATTR_GID) ? attr->st_gid : static_cast<gid_t>(-1);
        timespec times[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
        const bool set_times =
            to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW);
        if (to_set & FUSE_SET_ATTR_ATIME_NOW) times[0].tv_nsec = UTIME_NOW;
        else if (to_set & FUSE_SET_ATTR_ATIME) times[0] = attr->st_atim;
        if (to_set & FUSE_SET_ATTR_MTIME_NOW) times[1].tv_nsec = UTIME_NOW;
        else if (to_set & FUSE_SET_ATTR_MTIME) times[1] = attr->st_mtim;
        if (mode || uid != static_cast<uid_t>(-1) || gid != static_cast<gid_t>(-1) || set_times) {
            try {
                io::change_attributes(fs.policy_, user, host_file_of(*node), mode, uid, gid, set_times ? times : nullptr);
            } catch (const std::system_error& e) {
                trace("setattr", ino, ": " + std::string(e.what()));
                return void(fuse_reply_err(req, errno_of(e) == ESTALE ? ENOENT : errno_of(e)));
            }
        }
        if (!(to_set & FUSE_SET_ATTR_SIZE)) {
            struct stat fresh = fresh_attr(fs, *tree, *node, ino);
            return void(fuse_reply_attr(req, &fresh, kAttrTimeout));
        }
        // truncate(2), ftruncate(2) and open(O_TRUNC): a handle of its own keeps the image open
        // (or opens it, for truncate by name) while it is resized.
        (void)fi;
        const uint64_t new_size = static_cast<uint64_t>(attr->st_size);
        auto slot = fs.images_.acquire(key.dev, key.ino, node->image->path, node->image->path_is_symlink);
        fs.spawn(slot->strand, [&fs, req, ino, slot, tree, node, new_size, user]() -> Task<void> {
            try {
                co_await fs.open_for(slot, true, user, true);
                if (!slot->cache || slot->corrupt) fail(EROFS, "the image cannot be written");
                co_await resize(*slot, new_size);
                struct stat fresh = fresh_attr(fs, *tree, *node, ino);
                fs.release_slot(slot);
                fuse_reply_attr(req, &fresh, kAttrTimeout);
            } catch (const std::system_error& e) {
                fs.release_slot(slot);
                if (errno_of(e) == EROFS || errno_of(e) == ENOTSUP) fuse_reply_err(req, errno_of(e));
                else reply_error(req, fs.images_, slot->path, e);
            } catch (const std::exception& e) {
                fs.images_.report(slot->path, e.what());
                fs.release_slot(slot);
                fuse_reply_err(req, EIO);
            }
        });
    }

    static void release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
        Filesystem& fs = *fs_of(req);
        trace("release", ino);
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        auto slot = of->slot;
        // Drop the view on the image's strand, where its Image lives; the last handle's release
        // then writes back and closes the image there, in that order.
        asio::post(slot->strand, [of] { delete of; });
        fs.release_slot(slot);
        fuse_reply_err(req, 0);
    }

    /// SEEK_DATA / SEEK_HOLE (the kernel answers SEEK_SET/CUR/END itself): data is what qemu-img
    /// map calls data — allocated in the image or below it in the backing chain, compressed
    /// clusters included; zero clusters and unallocated ranges with nothing below are holes. The
    /// walk takes time in proportion to the metadata it passes, not to the disk's size.
    static void lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info* fi) {
        Filesystem& fs = *fs_of(req);
        trace("lseek", ino, " off=" + std::to_string(off) + " whence=" + std::to_string(whence));
        if (whence != SEEK_DATA && whence != SEEK_HOLE) return void(fuse_reply_err(req, EINVAL));
        if (off < 0) return void(fuse_reply_err(req, ENXIO));
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        fs.spawn(of->slot->strand, [&fs, req, of, off, whence]() -> Task<void> {
            try {
                const uint64_t size = of->view->size();
                uint64_t pos = static_cast<uint64_t>(off);
                if (pos >= size) co_return void(fuse_reply_err(req, ENXIO));
                // Cached writes of the active disk first, so that the image's map shows them.
                if (of->active && of->slot->cache && !of->slot->cache->empty()) co_await of->slot->cache->write_back();
                const bool want_data = whence == SEEK_DATA;
                while (pos < size) {
                    qcow2::MapRun run = co_await of->view->map(pos);
                    if (run.data == want_data) break;
                    pos = std::max(run.end, pos + 1);
                }
                if (pos >= size) {
                    if (want_data) co_return void(fuse_reply_err(req, ENXIO));
                    pos = size;  // the end of the file is a hole
                }
                fuse_reply_lseek(req, static_cast<off_t>(pos));
            } catch (const std::system_error& e) {
                reply_error(req, fs.images_, of->slot->path, e);
            } catch (const std::exception& e) {
                fs.images_.report(of->slot->path, e.what());
                fuse_reply_err(req, EIO);
            }
        });
    }

    static void statfs(fuse_req_t req, fuse_ino_t ino) {
        trace("statfs", ino);
        struct statvfs sv{};
        if (::statvfs(fs_of(req)->options_.source_dir.c_str(), &sv) != 0) return void(fuse_reply_err(req, errno));
        fuse_reply_statfs(req, &sv);
    }
};

const fuse_lowlevel_ops& Filesystem::operations() {
    static const fuse_lowlevel_ops ops = [] {
        fuse_lowlevel_ops o{};
        o.init = Handlers::init;
        o.lookup = Handlers::lookup;
        o.forget = Handlers::forget;
        o.forget_multi = Handlers::forget_multi;
        o.getattr = Handlers::getattr;
        o.opendir = Handlers::opendir;
        o.readdir = Handlers::readdir;
        o.releasedir = Handlers::releasedir;
        o.open = Handlers::open;
        o.read = Handlers::read;
        o.release = Handlers::release;
        o.write = Handlers::write;
        o.flush = Handlers::flush;
        o.fsync = Handlers::fsync;
        o.fallocate = Handlers::fallocate;
        o.setattr = Handlers::setattr;
        o.statfs = Handlers::statfs;
        o.lseek = Handlers::lseek;
        return o;
    }();
    return ops;
}

}  // namespace qcowfs::fs
