// Host file policy: a path walk that never leaves the rules (own mount, allowed directories,
// regular files only), opens and checks made with a requesting user's rights, attribute changes
// on the checked file.
#include "qcowfs/io/host.hpp"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>

#include "qcowfs/format/error.hpp"

namespace qcowfs::io {
namespace {

constexpr int kMaxSymlinks = 40;  // as the kernel's own path walk

/// Owns a file descriptor.
class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) : fd_(fd) {}
    Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    Fd& operator=(Fd&& o) noexcept {
        if (this != &o) {
            reset();
            fd_ = std::exchange(o.fd_, -1);
        }
        return *this;
    }
    ~Fd() { reset(); }
    int get() const { return fd_; }
    int release() { return std::exchange(fd_, -1); }
    void reset() {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }

private:
    int fd_ = -1;
};

/// A path walked to its end: an O_PATH descriptor of the file, its real path, its attributes.
struct Walked {
    Fd fd;
    std::string real;  // canonical: every symlink resolved
    struct stat st {};
};

FileIdentity identity_of(const struct stat& st) {
    return FileIdentity{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)};
}

/// Type, mode and ids of an O_PATH descriptor without asking a FUSE server for fresh attributes
/// (AT_STATX_DONT_SYNC): a walk that met a FUSE mount must not wait on it.
struct stat quick_stat(int fd) {
    struct statx sx {};
    if (::statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW | AT_STATX_DONT_SYNC,
                STATX_TYPE | STATX_MODE | STATX_UID | STATX_GID | STATX_INO, &sx) != 0)
        fail(errno, "cannot examine it");
    struct stat st {};
    st.st_dev = makedev(sx.stx_dev_major, sx.stx_dev_minor);
    st.st_ino = sx.stx_ino;
    st.st_mode = sx.stx_mode;
    st.st_uid = sx.stx_uid;
    st.st_gid = sx.stx_gid;
    return st;
}

bool is_under(const std::string& path, const std::string& dir) {
    if (dir == "/") return true;
    return path == dir || (path.size() > dir.size() && path.compare(0, dir.size(), dir) == 0 && path[dir.size()] == '/');
}

const char* type_name(mode_t mode) {
    if (S_ISDIR(mode)) return "directory";
    if (S_ISFIFO(mode)) return "FIFO";
    if (S_ISSOCK(mode)) return "socket";
    if (S_ISCHR(mode)) return "character device";
    if (S_ISBLK(mode)) return "block device";
    if (S_ISLNK(mode)) return "symlink";
    return "special file";
}

/// Whether the permission bits of `st` give `user` every access in `want` (R_OK, W_OK, X_OK):
/// the host's rule without ACLs, for a daemon that cannot take on the user's ids.
bool bits_allow(const struct stat& st, const Credentials& user, int want) {
    if (user.uid == 0) return true;
    unsigned bits;
    if (st.st_uid == user.uid) {
        bits = (st.st_mode >> 6) & 7;
    } else if (st.st_gid == user.gid ||
               std::find(user.groups.begin(), user.groups.end(), st.st_gid) != user.groups.end()) {
        bits = (st.st_mode >> 3) & 7;
    } else {
        bits = st.st_mode & 7;
    }
    return (bits & static_cast<unsigned>(want)) == static_cast<unsigned>(want);
}

/// Where a walk stands: an O_PATH descriptor of a directory, its canonical path and its stat.
struct WalkPosition {
    Fd dir;
    std::string real;  // canonical path of `dir`; "" is the root
    struct stat st {};
};

/// The walk's starting point, "/".
WalkPosition walk_root() {
    Fd root(::open("/", O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (root.get() < 0) fail(errno, "cannot open /");
    WalkPosition at{std::move(root), "", {}};
    at.st = quick_stat(at.dir.get());
    return at;
}

/// Puts the components of `p` ("a/b//c" -> a, b, c) in front of the ones still to walk.
void push_front_components(std::deque<std::string>& pending, const std::string& p) {
    std::vector<std::string> parts;
    size_t i = 0;
    while (i <= p.size()) {
        size_t j = p.find('/', i);
        if (j == std::string::npos) j = p.size();
        if (j > i) parts.push_back(p.substr(i, j - i));
        i = j + 1;
    }
    pending.insert(pending.begin(), parts.begin(), parts.end());
}

/// Steps to the parent of `at` ("..").
void walk_up(WalkPosition& at) {
    Fd up(::openat(at.dir.get(), "..", O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (up.get() < 0) fail(errno, "cannot open the parent of " + at.real);
    at.dir = std::move(up);
    at.st = quick_stat(at.dir.get());
    if (auto slash = at.real.rfind('/'); slash != std::string::npos) at.real.resize(slash);
}

/// Opens component `name` of `at` without following it, refusing anything on qcowfs's own mount.
Fd open_component(const HostPolicy& policy, const WalkPosition& at, const std::string& name, const std::string& candidate,
                  struct stat& st) {
    if (!policy.own_mount.empty() && is_under(candidate, policy.own_mount))
        fail(EACCES, "it lies on qcowfs's own mount " + policy.own_mount);
    Fd fd(::openat(at.dir.get(), name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
    if (fd.get() < 0) fail(errno, "cannot open " + candidate);
    st = quick_stat(fd.get());
    if (policy.own_dev != 0 && static_cast<uint64_t>(st.st_dev) == policy.own_dev)
        fail(EACCES, "it lies on qcowfs's own mount");
    return fd;
}

/// The target of symlink `fd` (named `candidate`), never empty.
std::string read_symlink(const Fd& fd, const std::string& candidate) {
    std::string target(4096, '\0');
    ssize_t n = ::readlinkat(fd.get(), "", target.data(), target.size());
    if (n < 0) fail(errno, "cannot read symlink " + candidate);
    target.resize(static_cast<size_t>(n));
    if (target.empty()) fail(ENOENT, "empty symlink " + candidate);
    return target;
}

/// Walks absolute `path` one component at a time with O_PATH|O_NOFOLLOW opens, resolving
/// symlinks itself: it never steps onto the own mount (by path or device), follows at most
/// kMaxSymlinks links, and the final one only if `follow_final`. With `bits_user`, each directory
/// searched must give that user search permission by its bits. Throws std::system_error.
Walked walk(const HostPolicy& policy, const std::string& path, bool follow_final, const Credentials* bits_user) {
    if (path.empty() || path.front() != '/') fail(EINVAL, "'" + path + "' is not an absolute path");
    std::deque<std::string> pending;
    push_front_components(pending, path);
    WalkPosition at = walk_root();
    int links = 0;
    while (!pending.empty()) {
        std::string name = std::move(pending.front());
        pending.pop_front();
        if (name == ".") continue;
        if (bits_user && !bits_allow(at.st, *bits_user, X_OK))
            fail(EACCES, "no search permission on " + (at.real.empty() ? std::string("/") : at.real));
        if (name == "..") {
            walk_up(at);
            continue;
        }
        const std::string candidate = at.real + "/" + name;
        struct stat st {};
        Fd fd = open_component(policy, at, name, candidate, st);
        const bool last = pending.empty();
        if (S_ISLNK(st.st_mode)) {
            if (last && !follow_final) fail(ESTALE, candidate + " is now a symlink");
            if (++links > kMaxSymlinks) fail(ELOOP, "too many symlinks in " + path);
            std::string target = read_symlink(fd, candidate);
            push_front_components(pending, target);
            if (target.front() == '/') at = walk_root();
            continue;
        }
        if (last) return Walked{std::move(fd), candidate, st};
        if (!S_ISDIR(st.st_mode)) fail(ENOTDIR, candidate + " is not a directory");
        at = WalkPosition{std::move(fd), candidate, st};
    }
    // The path named a directory ("/", or ending in "." or ".."): never an image.
    return Walked{std::move(at.dir), at.real.empty() ? "/" : at.real, at.st};
}

/// Opens the file behind O_PATH descriptor `fd` for reading or writing: the kernel applies its
/// permission checks to that very inode, with the calling thread's file system ids. O_NONBLOCK
/// and O_NOCTTY: harmless on a regular file, and nothing else reaches here.
Fd reopen(int fd, bool writable, bool noatime = false) {
    std::string proc = "/proc/self/fd/" + std::to_string(fd);
    const int flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK | O_NOCTTY;
    if (noatime) {
        Fd quiet(::open(proc.c_str(), flags | O_NOATIME));
        if (quiet.get() >= 0 || errno != EPERM) {
            if (quiet.get() < 0) fail(errno, "cannot open it for reading");
            return quiet;
        }
    }
    Fd out(::open(proc.c_str(), flags));
    if (out.get() < 0) fail(errno, writable ? "cannot open it for writing" : "cannot open it for reading");
    return out;
}

/// Takes on `user`'s file system ids on this thread only (raw system calls: glibc's setgroups
/// would change every thread) and restores the daemon's at scope exit. Only root can.
class FsIds {
public:
    explicit FsIds(const Credentials& user) {
        saved_uid_ = static_cast<uid_t>(::syscall(SYS_setfsuid, -1));
        saved_gid_ = static_cast<gid_t>(::syscall(SYS_setfsgid, -1));
        int n = ::getgroups(0, nullptr);
        saved_groups_.resize(static_cast<size_t>(std::max(n, 0)));
        if (n > 0) saved_groups_.resize(static_cast<size_t>(::getgroups(n, saved_groups_.data())));
        bool ok = ::syscall(SYS_setgroups, user.groups.size(), user.groups.data()) == 0;
        ::syscall(SYS_setfsgid, user.gid);
        ::syscall(SYS_setfsuid, user.uid);
        ok = ok && static_cast<uid_t>(::syscall(SYS_setfsuid, -1)) == user.uid &&
             static_cast<gid_t>(::syscall(SYS_setfsgid, -1)) == user.gid;
        if (!ok) {
            restore();
            fail(EPERM, "cannot take on the file system ids of user " + std::to_string(user.uid));
        }
    }
    ~FsIds() { restore(); }
    FsIds(const FsIds&) = delete;
    FsIds& operator=(const FsIds&) = delete;

private:
    void restore() {
        ::syscall(SYS_setfsuid, saved_uid_);
        ::syscall(SYS_setfsgid, saved_gid_);
        ::syscall(SYS_setgroups, saved_groups_.size(), saved_groups_.data());
    }
    uid_t saved_uid_;
    gid_t saved_gid_;
    std::vector<gid_t> saved_groups_;
};

bool can_take_user_ids() { return ::geteuid() == 0; }

const char* role_name(FileRole role) {
    switch (role) {
        case FileRole::image: return "image";
        case FileRole::backing: return "backing file";
        case FileRole::data_file: return "external data file";
    }
    return "file";
}

std::string allowed_list(const HostPolicy& policy) {
    std::string out;
    for (const auto& d : policy.allowed_dirs) out += (out.empty() ? "" : ", ") + d;
    return out.empty() ? std::string("(none)") : out;
}

/// Walks `path` as the calling thread's ids allow and checks what every open of `role` needs.
Walked walk_checked(const HostPolicy& policy, const std::string& path, FileRole role, bool follow_final,
                    const Credentials* bits_user) {
    Walked w = walk(policy, path, follow_final, bits_user);
    if (!S_ISREG(w.st.st_mode))
        fail(EACCES, "it is a " + std::string(type_name(w.st.st_mode)) + ", not a regular file");
    if (role != FileRole::image) {
        bool allowed = false;
        for (const auto& d : policy.allowed_dirs) allowed = allowed || is_under(w.real, d);
        if (!allowed)
            fail(EACCES, "it resolves to " + w.real + ", outside the directories images may use (" +
                             allowed_list(policy) + "; add one with -o allow_dir=DIR)");
    }
    return w;
}

/// Walks `f.path` with `user`'s rights and opens what it reaches for reading (and writing) as
/// the user would (permission bits for an unprivileged daemon); returns its identity. Throws
/// EACCES naming the file and why.
FileIdentity access_as(const HostPolicy& policy, const Credentials& user, const HostFile& f, bool write) {
    try {
        if (can_take_user_ids()) {
            FsIds ids(user);
            Walked wk = walk_checked(policy, f.path, f.role, f.follow_final, nullptr);
            reopen(wk.fd.get(), write);
            return identity_of(wk.st);
        }
        Walked wk = walk_checked(policy, f.path, f.role, f.follow_final, &user);
        if (!bits_allow(wk.st, user, write ? R_OK | W_OK : R_OK))
            fail(EACCES, write ? "no read and write permission" : "no read permission");
        return identity_of(wk.st);
    } catch (const std::system_error& e) {
        // An image that is not there any more (as far as the user can see) moved since the scan:
        // the caller may look again; anything else is a refusal.
        if (f.role == FileRole::image && errno_of(e) == ENOENT) fail(ESTALE, f.path + " is not there any more");
        fail(EACCES, "user " + std::to_string(user.uid) + " may not " + (write ? "write " : "read ") +
                         role_name(f.role) + " " + f.path + ": " + reason_of(e));
    }
}

FileIdentity check_readable_by(const HostPolicy& policy, const Credentials& user, const HostFile& f) {
    return access_as(policy, user, f, false);
}

}  // namespace

std::unique_ptr<File> open_host_file(const Executor& executor, const HostPolicy& policy, const HostOpen& request,
                                     FileIdentity* identity) {
    const bool follow = request.role == FileRole::image ? request.follow_final : true;
    std::optional<FileIdentity> user_saw;
    if (request.on_behalf_of && needs_access_check(*request.on_behalf_of)) {
        // The user may read it, or the daemon does not open it at all.
        HostFile probe{request.path, request.role, follow, {}};
        user_saw = check_readable_by(policy, *request.on_behalf_of, probe);
    }
    Walked w = walk_checked(policy, request.path, request.role, follow, nullptr);
    if (request.expect && identity_of(w.st) != *request.expect)
        fail(ESTALE, "it was replaced since the directory scan");
    if (user_saw && identity_of(w.st) != *user_saw) fail(ESTALE, "it changed while being opened");
    Fd fd = reopen(w.fd.get(), request.writable);
    struct stat st {};
    if (::fstat(fd.get(), &st) != 0) fail(errno, "cannot examine it");
    if (identity_of(st) != identity_of(w.st) || !S_ISREG(st.st_mode)) fail(ESTALE, "it changed while being opened");
    if (identity) *identity = identity_of(st);
    auto file = adopt_file(executor, fd.release(), request.path, policy.locking);
    file->set_lock(LockMode::read);
    return file;
}

int open_regular(const HostPolicy& policy, const std::string& path, bool follow_final, const Credentials* as) {
    const bool switch_ids = as && needs_access_check(*as) && can_take_user_ids();
    const Credentials* bits_user = as && needs_access_check(*as) && !switch_ids ? as : nullptr;
    std::optional<FsIds> ids;
    if (switch_ids) ids.emplace(*as);
    Walked w = walk_checked(policy, path, FileRole::image, follow_final, bits_user);
    if (bits_user && !bits_allow(w.st, *bits_user, R_OK)) fail(EACCES, "no read permission");
    return reopen(w.fd.get(), false, true).release();
}

Credentials credentials_of_user(uid_t uid, gid_t gid) {
    Credentials c{uid, gid, {}};
    struct passwd pw {};
    struct passwd* found = nullptr;
    std::vector<char> buf(16384);
    if (::getpwuid_r(uid, &pw, buf.data(), buf.size(), &found) == 0 && found) {
        int n = 64;
        std::vector<gid_t> groups(static_cast<size_t>(n));
        if (::getgrouplist(pw.pw_name, gid, groups.data(), &n) < 0) {
            groups.resize(static_cast<size_t>(n));
            ::getgrouplist(pw.pw_name, gid, groups.data(), &n);
        }
        groups.resize(static_cast<size_t>(std::max(n, 0)));
        c.groups = std::move(groups);
    }
    return c;
}

bool needs_access_check(const Credentials& user) { return user.uid != ::geteuid() && user.uid != 0; }

void check_user_access(const HostPolicy& policy, const Credentials& user, const std::vector<HostFile>& files,
                       bool write) {
    if (!needs_access_check(user)) return;
    for (const HostFile& f : files) {
        const bool w = write && f.role != FileRole::backing;
        if (access_as(policy, user, f, w) != f.identity) {
            if (f.role == FileRole::image) fail(ESTALE, f.path + " is another file now");
            fail(EACCES, "user " + std::to_string(user.uid) + " may not " + (w ? "write " : "read ") +
                             role_name(f.role) + " " + f.path + ": it is not the file that is open");
        }
    }
}

void change_attributes(const HostPolicy& policy, const Credentials& user, const HostFile& file,
                       std::optional<mode_t> mode, uid_t uid, gid_t gid, const struct timespec* times) {
    std::optional<FsIds> ids;
    if (needs_access_check(user) && can_take_user_ids()) ids.emplace(user);
    Walked w = walk(policy, file.path, file.follow_final, nullptr);
    if (!S_ISREG(w.st.st_mode) || identity_of(w.st) != file.identity)
        fail(ESTALE, file.path + " is not the file that was scanned");
    const std::string proc = "/proc/self/fd/" + std::to_string(w.fd.get());
    // chmod and utimensat through the descriptor's magic link act on that inode; fchownat takes
    // the O_PATH descriptor itself.
    if (mode && ::chmod(proc.c_str(), *mode) != 0) fail(errno, "chmod of " + file.path + " failed");
    if ((uid != static_cast<uid_t>(-1) || gid != static_cast<gid_t>(-1)) &&
        ::fchownat(w.fd.get(), "", uid, gid, AT_EMPTY_PATH) != 0)
        fail(errno, "chown of " + file.path + " failed");
    if (times && ::utimensat(AT_FDCWD, proc.c_str(), times, 0) != 0)
        fail(errno, "setting the times of " + file.path + " failed");
}

std::optional<struct stat> stat_host_file(const HostPolicy& policy, const HostFile& file) {
    try {
        Walked w = walk(policy, file.path, file.follow_final, nullptr);
        struct stat st {};
        if (::fstat(w.fd.get(), &st) != 0 || identity_of(st) != file.identity) return std::nullopt;
        return st;
    } catch (const std::system_error&) {
        return std::nullopt;
    }
}

}  // namespace qcowfs::io
