// FUSE low-level request handlers: every request is answered exactly once, errors become errno.
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <boost/asio/post.hpp>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "qcowfs/format/error.hpp"
#include "qcowfs/fs/filesystem.hpp"
#include "qcowfs/qcow2/disk.hpp"
#include "qcowfs/util/buffer_pool.hpp"
#include "qcowfs/util/log.hpp"

namespace qcowfs::fs {
namespace {

constexpr double kEntryTimeout = 0.3;  // seconds: keeps added/removed images visible within 1 s
constexpr double kAttrTimeout = 0.3;

constexpr mode_t kWriteBits = S_IWUSR | S_IWGRP | S_IWOTH;


/// The extended attribute that turns copy-on-read on or off per image (Handlers::setxattr).
constexpr std::string_view kCopyOnReadXattr = "user.qcowfs.copy_on_read";

/// State behind fuse_file_info::fh for an open exposed file.
struct OpenFile {
    std::shared_ptr<ImageSlot> slot;
    std::shared_ptr<qcow2::BlockSource> view;
    bool active = false;    // the active disk (reads go through the disk's cache when there is one)
    bool writable = false;  // opened for writing (then the disk is writable)
};

/// The answer to a request for a node the view no longer has (its file was removed, replaced or
/// renamed away): ESTALE makes the kernel look the name up again (once) and redo the request, so
/// the caller gets ENOENT if the name is gone, or the file that has it now.
constexpr int kGoneFromView = ESTALE;

/// Whether `e` says the image file is not at the path the view has for it (ENOENT: gone;
/// ESTALE: another file there now): renamed or replaced since the scan, or the scan ran across a
/// rename. A fresh scan tells where it is now, if anywhere.
bool view_behind(const std::system_error& e) { return errno_of(e) == ENOENT || errno_of(e) == ESTALE; }

/// The errno to answer for a host file refusal: ESTALE (the scanned file was replaced) is ENOENT,
/// as for a file removed.
int answer_of(const std::system_error& e) { return errno_of(e) == ESTALE ? ENOENT : errno_of(e); }

/// run()'s default: nothing to undo before replying to a failed request.
struct NoCleanup {
    void operator()() const {}
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

/// A write's bytes: the request buffer they lie in (taken over from the reader), or a copy.
struct WriteData {
    Filesystem::RequestBuffer owner{nullptr, Filesystem::BufferReturn{}};
    PooledBuffer copy;
    std::span<const std::byte> bytes;  // into owner or copy (both keep their bytes when moved)
};

/// Writes at least this large keep the request buffer instead of copying it (Handlers::write).
constexpr size_t kZeroCopyWriteBytes = 64 << 10;

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
void append_part(std::string& out, std::string_view part) { out.append(part); }
template <class T>
    requires std::is_integral_v<T>
void append_part(std::string& out, T part) {
    out.append(std::to_string(part));
}

/// A debug line for a request: built only when debug logging is on (requests are hot; the parts
/// are strings and numbers, joined as they are).
template <class... Parts>
void trace(const char* op, fuse_ino_t ino, const Parts&... parts) {
    if (!log::debug_enabled()) return;
    std::string line = std::string(op) + " ino=" + std::to_string(ino);
    (append_part(line, parts), ...);
    log::debug(line);
}

}  // namespace

struct stat Filesystem::attr_of(const Tree& tree, const Node& node) const {
    struct stat st = node.attr;
    if (options_.read_only) st.st_mode &= ~kWriteBits;
    // The scanned size lags a resize by up to a scan interval; qcowfs knows the size now.
    if (node.key.kind == NodeKey::Kind::image || node.key.kind == NodeKey::Kind::bitmap) {
        if (auto size = images_.live_size(node.key.dev, node.key.ino, tree.scanned_at()))
            st.st_size = static_cast<off_t>(*size);
    }
    return st;
}

std::string Filesystem::write_refusal(const Node& node) const {
    if (options_.read_only) return "the file system is mounted read-only";
    if (node.key.kind == NodeKey::Kind::snapshot) return "snapshots are read-only";
    if (node.key.kind == NodeKey::Kind::bitmap) return "bitmap files are read-only";
    if (!node.image) return "not an image";
    if (!node.image->read_only_reason.empty()) return node.image->read_only_reason;
    if (auto slot = images_.find(node.key.dev, node.key.ino); slot && slot->corrupt) return "the image is marked corrupt";
    return {};
}

struct Filesystem::Handlers {
    /// An inode of a request: its key and last attributes, the current tree, and the node there
    /// (nullptr when it is gone from the view, e.g. an image deleted while open).
    struct Resolved {
        NodeKey key;
        struct stat attr {};
        std::shared_ptr<const Tree> tree;
        const Node* node = nullptr;
    };

    /// Resolves `ino`; replies ENOENT and returns nullopt if it is unknown.
    static std::optional<Resolved> resolve(fuse_req_t req, Filesystem& fs, fuse_ino_t ino) {
        Resolved r;
        if (!fs.inodes_->get(ino, r.key, r.attr)) {
            fuse_reply_err(req, ENOENT);
            return std::nullopt;
        }
        r.tree = fs.tree();
        r.node = r.tree->find(r.key);
        return r;
    }

    /// Replies EROFS and returns true if `node` may not be written (`op` names the request in the
    /// -d trace).
    static bool refuse_write(fuse_req_t req, const Filesystem& fs, const Node& node, const char* op, fuse_ino_t ino) {
        std::string why = fs.write_refusal(node);
        if (why.empty()) return false;
        trace(op, ino, ": EROFS, ", why);
        fuse_reply_err(req, EROFS);
        return true;
    }

    /// Runs `body` (a function returning Task<int>) as a coroutine of `slot`'s image on this worker (through
    /// Filesystem::spawn, so shutdown waits for it) and gives `req` exactly one reply: the body
    /// replies itself and returns 0, or returns an errno to answer (an expected answer, not
    /// logged); a std::system_error it throws is answered by reply_error, anything else by EIO
    /// with its message logged. `on_failure` runs before every reply the body did not give (open
    /// and truncate give back the handle they took).
    template <class Body, class OnFailure = NoCleanup>
    static void run(fuse_req_t req, std::shared_ptr<ImageSlot> slot, Body body, OnFailure on_failure = {}) {
        Filesystem& fs = *fs_of(req);
        fs.spawn(slot->executor(), [&fs, req, slot, body = std::move(body),
                                    on_failure = std::move(on_failure)]() mutable -> Task<void> {
            int code = EIO;
            try {
                code = co_await body();
                if (code == 0) co_return;
            } catch (const std::system_error& e) {
                on_failure();
                reply_error(req, fs.images_, slot->path, e);
                co_return;
            } catch (const std::exception& e) {
                fs.images_.report(slot->path, e.what());
            }
            on_failure();
            fuse_reply_err(req, code);
        });
    }

    /// run() for a request that changes the disk: `body(disk)` if `fi`'s file was opened for
    /// writing, else EBADF.
    template <class Body>
    static void run_write(fuse_req_t req, fuse_file_info* fi, Body body) {
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        if (!of->writable || !of->slot->disk->writable()) return void(fuse_reply_err(req, EBADF));
        run(req, of->slot, [of, body = std::move(body)]() mutable { return body(*of->slot->disk); });
    }

    static void init(void* userdata, fuse_conn_info* conn) {
        conn->want |= FUSE_CAP_ASYNC_READ;
        static_cast<Filesystem*>(userdata)->direct_io_for_o_direct_ = conn->proto_major > 7 || conn->proto_minor >= 39;
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

    static void lookup(fuse_req_t req, fuse_ino_t parent, const char* name) { lookup_name(req, parent, name, false); }

    /// lookup(), or its second try after a fresh scan (`after_rescan`): a name the view lacks may
    /// have been added on the host since the last scan ("qemu-img create x.qcow2 && mkfs x.raw").
    static void lookup_name(fuse_req_t req, fuse_ino_t parent, std::string_view name, bool after_rescan) {
        Filesystem& fs = *fs_of(req);
        trace("lookup", parent, " name=", name);
        auto dir = resolve(req, fs, parent);
        if (!dir) return;
        const Node* node = dir->tree->child(dir->key, name);
        if (!node && !after_rescan && may_have_appeared(fs, dir->node, name))
            return fs.redo_after_scan([req, parent, name = std::string(name)] { lookup_name(req, parent, name, true); });
        if (!node) return void(fuse_reply_err(req, ENOENT));
        fuse_entry_param e{};
        e.attr = fs.attr_of(*dir->tree, *node);
        e.ino = fs.inodes_->ref(node->key, e.attr);
        e.attr.st_ino = e.ino;
        e.attr_timeout = kAttrTimeout;
        e.entry_timeout = kEntryTimeout;
        fuse_reply_entry(req, &e);
    }

    /// Whether `name`, missing from directory `dir` in the view, may be there after a fresh scan:
    /// a name of the view's own kind (NAME.raw: an image, a snapshot taken in place, a bitmap), or
    /// any name once the host directory's entries changed since the scan read them (its mtime or
    /// ctime moved, or it is gone or replaced). So probes for other names (".git", a library
    /// search) in an unchanged directory are answered at once.
    static bool may_have_appeared(Filesystem& fs, const Node* dir, std::string_view name) {
        constexpr std::string_view kRaw = ".raw";
        if (name.size() > kRaw.size() && name.substr(name.size() - kRaw.size()) == kRaw) return true;
        if (!dir || dir->host_path.empty()) return true;
        auto now = io::stat_host_file(
            fs.policy_, io::HostFile{dir->host_path, io::FileRole::image, false, io::FileIdentity{dir->key.dev, dir->key.ino}});
        auto same = [](const timespec& a, const timespec& b) { return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec; };
        return !now || !same(now->st_mtim, dir->attr.st_mtim) || !same(now->st_ctim, dir->attr.st_ctim);
    }

    static void forget(fuse_req_t req, fuse_ino_t ino, uint64_t n) {
        trace("forget", ino, " n=", n);
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
        auto r = resolve(req, fs, ino);
        if (!r) return;
        struct stat st = r->attr;
        if (r->node) {
            st = fs.attr_of(*r->tree, *r->node);
            fs.inodes_->update(r->key, st);
        } else if (ino == FUSE_ROOT_ID) {
            return void(fuse_reply_err(req, ENOENT));
        }
        // A node gone from the view (image deleted while open) keeps its last attributes.
        st.st_ino = ino;
        fuse_reply_attr(req, &st, kAttrTimeout);
    }

    /// The entries of directory `dir` (inode `ino`) as readdir hands them out: ".", "..", then
    /// the children in name order.
    static std::unique_ptr<OpenDir> list_dir(Filesystem& fs, const Tree& tree, const Node& dir, fuse_ino_t ino) {
        auto od = std::make_unique<OpenDir>();
        od->entries.push_back({".", ino, S_IFDIR});
        od->entries.push_back({"..", FUSE_ROOT_ID, S_IFDIR});
        for (const auto& [name, child_key] : dir.children) {
            const Node* child = tree.find(child_key);
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
        return od;
    }

    static void opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
        Filesystem& fs = *fs_of(req);
        trace("opendir", ino);
        auto r = resolve(req, fs, ino);
        if (!r) return;
        if (!r->node) return void(fuse_reply_err(req, kGoneFromView));
        if (r->key.kind != NodeKey::Kind::directory) return void(fuse_reply_err(req, ENOTDIR));
        fi->fh = reinterpret_cast<uint64_t>(list_dir(fs, *r->tree, *r->node, ino).release());
        if (fuse_reply_open(req, fi) != 0) delete reinterpret_cast<OpenDir*>(fi->fh);
    }

    static void readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
        trace("readdir", ino, " off=", off);
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

    /// What an open hands to its coroutine (libfuse's `fi` does not outlive the callback).
    struct OpenRequest {
        fuse_file_info info;
        io::HostFile image;       // the image file, where the view has it
        std::string snapshot_id;  // "": the active disk (or a bitmap)
        std::string bitmap;       // a bitmap file: the bitmap's name
        io::Credentials user;
        bool for_writing;     // the handle may write (or has O_TRUNC)
        bool writable_image;  // open the image writable (it is shared by every handle)
    };

    static void open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) { open_image(req, ino, *fi, false); }

    /// open(), or its second try (`after_rescan`) when the first found the image gone from the
    /// path the view had for it: the fresh view has it under its new path, or no longer has it.
    static void open_image(fuse_req_t req, fuse_ino_t ino, fuse_file_info info, bool after_rescan) {
        Filesystem& fs = *fs_of(req);
        fuse_file_info* fi = &info;
        trace("open", ino, " flags=", fi->flags);
        auto r = resolve(req, fs, ino);
        if (!r) return;
        if (r->key.kind == NodeKey::Kind::directory) return void(fuse_reply_err(req, EISDIR));
        if (!r->node || !r->node->image) return void(fuse_reply_err(req, kGoneFromView));
        // O_TRUNC arrives here (FUSE_CAP_ATOMIC_O_TRUNC), with any access mode: the truncation is a
        // write, refused like one, and done by open_file once the image is open.
        const bool for_writing = (fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & O_TRUNC);
        if (for_writing && refuse_write(req, fs, *r->node, "open", ino)) return;
        // Open the image writable whenever the image may be written, whatever this handle wants:
        // it is shared by every handle, and a later one may write.
        const ImageInfo& image = *r->node->image;
        const bool writable_image = !fs.options_.read_only && image.read_only_reason.empty();
        auto slot = fs.images_.acquire(r->key.dev, r->key.ino, image.path, image.path_is_symlink);
        const bool bitmap = r->key.kind == NodeKey::Kind::bitmap;
        OpenRequest rq{*fi,
                       host_file_of(*r->node),
                       bitmap ? "" : r->key.snapshot_id,
                       bitmap ? r->key.snapshot_id : "",
                       credentials_of(req),
                       for_writing,
                       writable_image};
        run(
            req, slot,
            [&fs, req, ino, slot, rq, after_rescan]() -> Task<int> {
                try {
                    co_return co_await open_file(fs, req, slot, rq);
                } catch (const std::system_error& e) {
                    if (after_rescan || !view_behind(e)) throw;
                }
                fs.release_slot(slot);
                co_await fs.fresh_scan();
                open_image(req, ino, rq.info, true);
                co_return 0;
            },
            [&fs, slot] { fs.release_slot(slot); });
    }

    /// The coroutine of open: opens the image or shares it, refuses a writer the disk cannot take
    /// (EROFS), empties the disk for O_TRUNC, and replies with a new OpenFile.
    static Task<int> open_file(Filesystem& fs, fuse_req_t req, std::shared_ptr<ImageSlot> slot, OpenRequest rq) {
        co_await fs.open_for(slot, rq.image, rq.writable_image, rq.user, rq.for_writing);
        qcow2::Disk& disk = *slot->disk;
        if (rq.for_writing && (!disk.writable() || slot->corrupt)) {
            // Opened read-only after all (no write permission on the host file, or the image
            // itself refuses writes): EROFS is an answer, not an image error.
            trace("open", 0, " ", slot->path, ": EROFS, ",
                  slot->corrupt ? std::string("marked corrupt") : disk.image().read_only_reason());
            co_return EROFS;
        }
        if ((rq.info.flags & O_TRUNC) && rq.snapshot_id.empty()) {
            try {
                co_await disk.resize(0);
            } catch (const std::system_error& e) {
                if (errno_of(e) != ENOTSUP) throw;
                // An image with snapshots cannot shrink: an answer.
                fs.images_.report(slot->path, "O_TRUNC refused: " + reason_of(e), ImageRegistry::Severity::notice);
                co_return ENOTSUP;
            }
        }
        auto of = std::make_unique<OpenFile>();
        of->slot = slot;
        of->active = rq.snapshot_id.empty() && rq.bitmap.empty();
        of->writable = rq.for_writing;
        if (rq.bitmap.empty())
            of->view = co_await disk.view(rq.snapshot_id);
        else
            of->view = co_await disk.bitmap_view(rq.bitmap);
        rq.info.fh = reinterpret_cast<uint64_t>(of.get());
        rq.info.keep_cache = 0;
        // O_DIRECT asks for no page cache: the handle gets none at all (FOPEN_DIRECT_IO). Through
        // the page cache's own O_DIRECT path, with the kernel's default auto_inval_data, every
        // read after a write first asks for the attributes (a GETATTR round trip while the
        // reader waits): 4 KiB 70/30 random read/write at QD32 ran at a quarter of the speed.
        // Only where the kernel drops the cached pages that a direct write covers (FUSE 7.39,
        // Linux 6.6), so that other handles' cached reads stay right.
        if ((rq.info.flags & O_DIRECT) && fs.direct_io_for_o_direct_) rq.info.direct_io = 1;
        if (fuse_reply_open(req, &rq.info) == 0) of.release();
        else fs.release_slot(slot);
        co_return 0;
    }

    static void read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
        trace("read", ino, " off=", off, " size=", size);
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        run(req, of->slot, [req, of, size, off]() -> Task<int> {
            const uint64_t vsize = of->view->size(), offset = static_cast<uint64_t>(off);
            if (offset >= vsize || size == 0) {
                fuse_reply_buf(req, nullptr, 0);
                co_return 0;
            }
            const size_t n = static_cast<size_t>(std::min<uint64_t>(size, vsize - offset));
            PooledBuffer buf(n);
            // The active disk of a writable image reads through its cache: cached writes show.
            co_await of->slot->disk->read(*of->view, offset, std::span<std::byte>(buf.data(), n));
            // The reply's copy and system call need no image state: the image's lock is let go.
            unlocked([&] { fuse_reply_buf(req, reinterpret_cast<const char*>(buf.data()), n); });
            co_return 0;
        });
    }

    static void write(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off, fuse_file_info* fi) {
        trace("write", ino, " off=", off, " size=", size);
        // libfuse owns `buf` only until this callback returns: a large write takes the request
        // buffer it lies in over from the reader (no copy of up to 1 MiB), a small one is copied.
        WriteData data;
        if (size >= kZeroCopyWriteBytes) data.owner = fs_of(req)->take_request_buffer(buf, size);
        if (!data.owner) {
            data.copy = PooledBuffer(size);
            if (size) std::memcpy(data.copy.data(), buf, size);
        }
        data.bytes = data.owner ? std::span(reinterpret_cast<const std::byte*>(buf), size)
                                : std::span<const std::byte>(data.copy.data(), size);
        run_write(req, fi, [req, data = std::move(data), off](qcow2::Disk& disk) -> Task<int> {
            if (off < 0) co_return EINVAL;
            if (data.bytes.empty()) {
                fuse_reply_write(req, 0);
                co_return 0;
            }
            const size_t n = co_await disk.write(static_cast<uint64_t>(off), data.bytes);
            if (n == 0) co_return ENOSPC;  // a shrink that came in between left it past the end
            unlocked([&] { fuse_reply_write(req, n); });
            co_return 0;
        });
    }

    static void flush(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
        trace("flush", ino);
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        if (!of->writable) return void(fuse_reply_err(req, 0));
        // close(2): write the cached data back so that errors reach the closing program.
        run_write(req, fi, [req](qcow2::Disk& disk) -> Task<int> {
            co_await disk.write_back();
            fuse_reply_err(req, 0);
            co_return 0;
        });
    }

    static void fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info* fi) {
        trace("fsync", ino, " datasync=", datasync);
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        if (!of->active) return void(fuse_reply_err(req, 0));  // snapshots never change
        // Any handle of the active disk may sync it (fsync on an O_RDONLY descriptor is allowed).
        run(req, of->slot, [req, of]() -> Task<int> {
            co_await of->slot->disk->flush();  // write-back, then Image::flush: durable
            fuse_reply_err(req, 0);
            co_return 0;
        });
    }

    static void fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t length, fuse_file_info* fi) {
        trace("fallocate", ino, " mode=", mode, " off=", off, " len=", length);
        if (off < 0 || length <= 0 || off > std::numeric_limits<off_t>::max() - length)
            return void(fuse_reply_err(req, EINVAL));
        const bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
        const int op = mode & ~FALLOC_FL_KEEP_SIZE;
        if (op != 0 && op != FALLOC_FL_ZERO_RANGE && !(op == FALLOC_FL_PUNCH_HOLE && keep_size))
            return void(fuse_reply_err(req, EOPNOTSUPP));
        const qcow2::Fill how = op == FALLOC_FL_PUNCH_HOLE ? qcow2::Fill::punch_hole
                                : op == FALLOC_FL_ZERO_RANGE ? qcow2::Fill::zero
                                                             : qcow2::Fill::allocate;
        run_write(req, fi, [req, how, keep_size, off, length](qcow2::Disk& disk) -> Task<int> {
            // Without KEEP_SIZE a range past the end grows the disk first (never PUNCH_HOLE).
            co_await disk.fill(how, static_cast<uint64_t>(off), static_cast<uint64_t>(length), !keep_size);
            fuse_reply_err(req, 0);
            co_return 0;
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

    static void setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info*) {
        change_attributes(req, ino, *attr, to_set, false);
    }

    /// setattr(), or its second try (`after_rescan`, see open_image). Everything it changes is
    /// set to a value, so doing it again is harmless.
    static void change_attributes(fuse_req_t req, fuse_ino_t ino, struct stat wanted, int to_set, bool after_rescan) {
        Filesystem& fs = *fs_of(req);
        const struct stat* attr = &wanted;
        trace("setattr", ino, " to_set=", to_set);
        auto r = resolve(req, fs, ino);
        if (!r) return;
        if (!r->node) return void(fuse_reply_err(req, kGoneFromView));
        if (fs.options_.read_only || r->key.kind != NodeKey::Kind::image) return void(fuse_reply_err(req, EROFS));
        if (to_set & FUSE_SET_ATTR_SIZE) {
            if (attr->st_size < 0) return void(fuse_reply_err(req, EINVAL));
            if (refuse_write(req, fs, *r->node, "setattr", ino)) return;
        }
        const io::Credentials user = credentials_of(req);
        try {
            change_host_attributes(fs, *r->node, *attr, to_set, user);
        } catch (const std::system_error& e) {
            trace("setattr", ino, ": ", e.what());
            if (after_rescan || !view_behind(e)) return void(fuse_reply_err(req, answer_of(e)));
            return fs.redo_after_scan([req, ino, wanted, to_set] { change_attributes(req, ino, wanted, to_set, true); });
        }
        if (to_set & FUSE_SET_ATTR_SIZE) {
            auto redo = [req, ino, wanted, to_set, after_rescan]() -> std::function<void()> {
                if (after_rescan) return nullptr;
                return [req, ino, wanted, to_set] { change_attributes(req, ino, wanted, to_set, true); };
            };
            return truncate(req, fs, std::move(*r), ino, static_cast<uint64_t>(wanted.st_size), user, redo());
        }
        struct stat fresh = fresh_attr(fs, *r->tree, *r->node, ino);
        fuse_reply_attr(req, &fresh, kAttrTimeout);
    }

    /// The mode, owner and times `to_set` asks for. They belong to the host image file: changed
    /// on the scanned file itself (never on whatever its path names now), with `user`'s rights.
    /// Throws std::system_error if that fails (ESTALE or ENOENT: the file is not at the path the
    /// view has for it).
    static void change_host_attributes(Filesystem& fs, const Node& node, const struct stat& attr, int to_set,
                                       const io::Credentials& user) {
        std::optional<mode_t> mode;
        if (to_set & FUSE_SET_ATTR_MODE) mode = attr.st_mode & 07777;
        uid_t uid = (to_set & FUSE_SET_ATTR_UID) ? attr.st_uid : static_cast<uid_t>(-1);
        gid_t gid = (to_set & FUSE_SET_ATTR_GID) ? attr.st_gid : static_cast<gid_t>(-1);
        timespec times[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
        const bool set_times =
            to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW);
        if (to_set & FUSE_SET_ATTR_ATIME_NOW) times[0].tv_nsec = UTIME_NOW;
        else if (to_set & FUSE_SET_ATTR_ATIME) times[0] = attr.st_atim;
        if (to_set & FUSE_SET_ATTR_MTIME_NOW) times[1].tv_nsec = UTIME_NOW;
        else if (to_set & FUSE_SET_ATTR_MTIME) times[1] = attr.st_mtim;
        if (!mode && uid == static_cast<uid_t>(-1) && gid == static_cast<gid_t>(-1) && !set_times) return;
        io::change_attributes(fs.policy_, user, host_file_of(node), mode, uid, gid, set_times ? times : nullptr);
    }

    /// truncate(2), ftruncate(2) and open(O_TRUNC) of an open file: a handle of its own keeps the
    /// image open (or opens it, for truncate by name) while it is resized.
    /// `redo` (if set) runs instead of a reply when the image is not at the path the view has for
    /// it, after a fresh scan (see open_image).
    static void truncate(fuse_req_t req, Filesystem& fs, Resolved r, fuse_ino_t ino, uint64_t new_size,
                         io::Credentials user, std::function<void()> redo = nullptr) {
        const ImageInfo& image = *r.node->image;
        auto slot = fs.images_.acquire(r.key.dev, r.key.ino, image.path, image.path_is_symlink);
        run(
            req, slot,
            [&fs, req, ino, slot, r = std::move(r), new_size, user, redo = std::move(redo)]() -> Task<int> {
                int refused = 0;
                bool behind = false;
                try {
                    // EROFS and ENOTSUP (a shrink of an image with snapshots) are answers, not logged.
                    refused = co_await refusal_of(resize_image(fs, slot, host_file_of(*r.node), user, new_size));
                } catch (const std::system_error& e) {
                    if (!redo || !view_behind(e)) throw;
                    behind = true;
                }
                if (behind) {
                    fs.release_slot(slot);
                    co_await fs.fresh_scan();
                    redo();
                    co_return 0;
                }
                if (refused) co_return refused;
                struct stat fresh = fresh_attr(fs, *r.tree, *r.node, ino);
                fs.release_slot(slot);
                fuse_reply_attr(req, &fresh, kAttrTimeout);
                co_return 0;
            },
            [&fs, slot] { fs.release_slot(slot); });
    }

    static Task<void> resize_image(Filesystem& fs, std::shared_ptr<ImageSlot> slot, io::HostFile image,
                                   io::Credentials user, uint64_t new_size) {
        co_await fs.open_for(slot, image, true, user, true);
        if (!slot->disk->writable() || slot->corrupt) fail(EROFS, "the image cannot be written");
        co_await slot->disk->resize(new_size);
    }

    /// Awaits `step`: 0 when it succeeds, EROFS or ENOTSUP when it throws one of them; other
    /// errors propagate.
    static Task<int> refusal_of(Task<void> step) {
        try {
            co_await std::move(step);
        } catch (const std::system_error& e) {
            if (errno_of(e) != EROFS && errno_of(e) != ENOTSUP) throw;
            co_return errno_of(e);
        }
        co_return 0;
    }

    static void release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
        Filesystem& fs = *fs_of(req);
        trace("release", ino);
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        // Drop the view under the image's lock, where its Image lives, and only then give the
        // handle back: the last handle's close must find no view left, or the closed Image would
        // live on in it, keeping the file and its QEMU locks open while a new open begins.
        fs.spawn(of->slot->executor(), [&fs, of]() -> Task<void> {
            auto slot = of->slot;
            delete of;
            fs.release_slot(slot);
            co_return;
        });
        fuse_reply_err(req, 0);
    }

    /// SEEK_DATA / SEEK_HOLE (the kernel answers SEEK_SET/CUR/END itself): data is what qemu-img
    /// map calls data — allocated in the image or below it in the backing chain, compressed
    /// clusters included; zero clusters and unallocated ranges with nothing below are holes. The
    /// walk takes time in proportion to the metadata it passes, not to the disk's size.
    static void lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info* fi) {
        trace("lseek", ino, " off=", off, " whence=", whence);
        if (whence != SEEK_DATA && whence != SEEK_HOLE) return void(fuse_reply_err(req, EINVAL));
        if (off < 0) return void(fuse_reply_err(req, ENXIO));
        auto* of = reinterpret_cast<OpenFile*>(fi->fh);
        run(req, of->slot, [req, of, off, whence]() -> Task<int> {
            auto pos = co_await of->slot->disk->seek(*of->view, static_cast<uint64_t>(off), whence == SEEK_DATA);
            if (!pos) co_return ENXIO;
            fuse_reply_lseek(req, static_cast<off_t>(*pos));
            co_return 0;
        });
    }

    /// setxattr and removexattr of kCopyOnReadXattr on an image node: "1" or "0" turns
    /// copy-on-read on or off for that image whatever -o copy_on_read says; removing it goes back
    /// to the mount's option. Kept for the mount's life (not on the host file) and applied to the
    /// open image at once. Only a user who may write the image may change it: EROFS where it
    /// cannot be written (-o ro, snapshots, read-only images), EACCES where the host denies the
    /// user write access. Other names: ENOTSUP. There is no getxattr: answering it would cost
    /// every write a request (the kernel asks for security.capability before each one), and
    /// without it the kernel stops asking.
    static void setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size, int flags) {
        trace("setxattr", ino, " name=", name);
        if (std::string_view(name) != kCopyOnReadXattr) return void(fuse_reply_err(req, ENOTSUP));
        const std::string_view v(value, size);
        if (v != "1" && v != "0") return void(fuse_reply_err(req, EINVAL));
        change_copy_on_read(req, ino, v == "1", flags);
    }

    static void removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
        trace("removexattr", ino, " name=", name);
        if (std::string_view(name) != kCopyOnReadXattr) return void(fuse_reply_err(req, ENOTSUP));
        change_copy_on_read(req, ino, std::nullopt, 0);
    }

    /// Sets (`on`) or removes the copy-on-read setting of image `ino` (see setxattr); tried again
    /// after a fresh scan (`after_rescan`, see open_image) if the image moved since the last one.
    static void change_copy_on_read(fuse_req_t req, fuse_ino_t ino, std::optional<bool> on, int flags,
                                    bool after_rescan = false) {
        Filesystem& fs = *fs_of(req);
        auto r = resolve(req, fs, ino);
        if (!r) return;
        if (!r->node) return void(fuse_reply_err(req, kGoneFromView));
        if (r->key.kind == NodeKey::Kind::directory) return void(fuse_reply_err(req, ENOTSUP));
        if (refuse_write(req, fs, *r->node, "setxattr", ino)) return;
        try {
            io::check_user_access(fs.policy_, credentials_of(req), {host_file_of(*r->node)}, true);
        } catch (const std::system_error& e) {
            trace("setxattr", ino, ": ", e.what());
            if (after_rescan || !view_behind(e)) return void(fuse_reply_err(req, answer_of(e)));
            return fs.redo_after_scan([req, ino, on, flags] { change_copy_on_read(req, ino, on, flags, true); });
        }
        const std::pair key{r->key.dev, r->key.ino};
        {
            std::lock_guard lock(fs.copy_on_read_mutex_);
            const bool exists = fs.copy_on_read_.contains(key);
            if ((flags & XATTR_CREATE) && exists) return void(fuse_reply_err(req, EEXIST));
            if (((flags & XATTR_REPLACE) || !on) && !exists) return void(fuse_reply_err(req, ENODATA));
            if (on) fs.copy_on_read_[key] = *on;
            else fs.copy_on_read_.erase(key);
        }
        log::info(r->node->image->path + ": copy-on-read " +
                  (on ? (*on ? "on" : "off") : std::string(fs.options_.copy_on_read ? "on" : "off") + " (the mount's)"));
        if (auto slot = fs.images_.find(r->key.dev, r->key.ino)) {
            // The open image learns it under its lock, before the reply: a read sent after the
            // reply, on any worker, sees the setting (a later open reads it itself).
            fs.spawn(slot->executor(), [&fs, slot, req]() -> Task<void> {
                if (slot->disk) slot->disk->set_copy_on_read(fs.copy_on_read_for(slot->dev, slot->ino));
                fuse_reply_err(req, 0);
                co_return;
            });
            return;
        }
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
        o.write = Handlers::write;
        o.flush = Handlers::flush;
        o.fsync = Handlers::fsync;
        o.fallocate = Handlers::fallocate;
        o.setattr = Handlers::setattr;
        o.statfs = Handlers::statfs;
        o.lseek = Handlers::lseek;
        o.setxattr = Handlers::setxattr;
        o.removexattr = Handlers::removexattr;
        return o;
    }();
    return ops;
}

}  // namespace qcowfs::fs
