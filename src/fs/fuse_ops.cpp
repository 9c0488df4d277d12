// FUSE low-level request handlers: every request is answered exactly once, errors become errno.
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <sys/statvfs.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <cstring>
#include <vector>

#include "qcowfs/format/error.hpp"
#include "qcowfs/fs/filesystem.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "qcowfs/util/log.hpp"

namespace qcowfs::fs {
namespace {

constexpr double kEntryTimeout = 0.3;  // seconds: keeps added/removed images visible within 1 s
constexpr double kAttrTimeout = 0.3;

/// State behind fuse_file_info::fh for an open exposed file.
struct OpenFile {
    std::shared_ptr<ImageSlot> slot;
    std::shared_ptr<qcow2::BlockSource> view;
};

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

/// Logs a request when -d is on.
void trace(const char* op, fuse_ino_t ino, const std::string& more = {}) {
    if (log::debug_enabled()) log::debug(std::string(op) + " ino=" + std::to_string(ino) + more);
}


}  // namespace

template <class Ex, class Body>
void Filesystem::spawn(const Ex& executor, Body body) {
    ++inflight_;
    asio::co_spawn(executor, std::move(body), [this](std::exception_ptr) { --inflight_; });
}

struct stat Filesystem::attr_of(const Node& node) const {
    struct stat st = node.attr;
    if (options_.read_only) st.st_mode &= ~(S_IWUSR | S_IWGRP | S_IWOTH);
    return st;
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
        e.attr = fs.attr_of(*node);
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
            st = fs.attr_of(*node);
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
        if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC)) {
            // The write path is not implemented yet: every exposed file is read-only.
            return void(fuse_reply_err(req, EROFS));
        }
        auto slot = fs.images_.acquire(key.dev, key.ino, node->image->path);
        fuse_file_info info = *fi;  // *fi does not outlive this call
        std::string snapshot_id = key.snapshot_id;
        qcow2::OpenOptions options;
        options.opener = [&io = fs.io_](const std::string& path, bool writable) {
            return io::open_file(io.get_executor(), path, writable);
        };
        options.l2_cache_bytes = fs.options_.l2_cache_bytes;
        options.compressed_cache_bytes = fs.options_.compressed_cache_bytes;
        fs.spawn(slot->strand, [&fs, req, slot, info, snapshot_id, options]() mutable -> Task<void> {
            try {
                {
                    // One open per image at a time; later handles share the Image.
                    auto opening = co_await slot->open_mutex.lock();
                    if (!slot->image) slot->image = co_await qcow2::Image::open(slot->path, options);
                }
                auto of = std::make_unique<OpenFile>();
                of->slot = slot;
                if (snapshot_id.empty())
                    of->view = slot->image->active();
                else
                    of->view = co_await slot->image->snapshot(snapshot_id);
                info.fh = reinterpret_cast<uint64_t>(of.get());
                info.keep_cache = 0;
                if (fuse_reply_open(req, &info) == 0) of.release();
                else fs.images_.release(slot);
            } catch (const std::system_error& e) {
                fs.images_.report(slot->path, reason_of(e));
                fs.images_.release(slot);
                fuse_reply_err(req, errno_of(e));
            } catch (const std::exception& e) {
                fs.images_.report(slot->path, e.what());
                fs.images_.release(slot);
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
                co_await of->view->read(offset, std::span<std::byte>(buf.get(), n));
                fuse_reply_buf(req, reinterpret_cast<const char*>(buf.get()), n);
            } catch (const std::system_error& e) {
                fs.images_.report(of->slot->path, reason_of(e));
                fuse_reply_err(req, errno_of(e));
            } catch (const std::exception& e) {
                fs.images_.report(of->slot->path, e.what());
                fuse_reply_err(req, EIO);
            }
        });
    }

    static void release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
        Filesystem& fs = *fs_of(req);
        trace("release", ino);
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        auto slot = of->slot;
        // Drop the view on the image's strand, where its Image lives.
        asio::post(slot->strand, [of] { delete of; });
        fs.images_.release(slot);
        fuse_reply_err(req, 0);
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
        o.statfs = Handlers::statfs;
        return o;
    }();
    return ops;
}

}  // namespace qcowfs::fs
