// qcowfs command line: parse options, check the mount can work, mount, serve, unmount on signals.
#include <fcntl.h>
#include <malloc.h>
#include <fuse_lowlevel.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <algorithm>
#include <climits>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "qcowfs/format/error.hpp"
#include "qcowfs/fs/filesystem.hpp"
#include "qcowfs/util/log.hpp"

namespace {

using namespace qcowfs;

constexpr const char* kUsage =
    "usage: qcowfs [options] SOURCE_DIR MOUNTPOINT\n"
    "\n"
    "Shows every qcow2 image below SOURCE_DIR as a raw file NAME.raw below MOUNTPOINT,\n"
    "and each internal snapshot as NAME@SNAPSHOT.raw (read-only). NAME.raw can be written\n"
    "unless the mount is -o ro, or the image is corrupt, has unknown incompatible features,\n"
    "is the backing file of another image, or its host file is not writable (EROFS).\n"
    "Writes are cached (-o write_cache) and made durable by fsync, and every 5 s; closing\n"
    "an image writes everything back and leaves it clean. Writing past the end, truncate\n"
    "and fallocate change the disk size (rounded up to 512 bytes; O_TRUNC empties the\n"
    "disk); an image with internal snapshots cannot shrink (EOPNOTSUPP).\n"
    "\n"
    "options:\n"
    "  -f                 stay in the foreground (default: daemonize once mounted)\n"
    "  -d                 log every request (implies nothing else; combine with -f to see it)\n"
    "  -o ro              mount everything read-only\n"
    "  -o allow_dir=DIR   backing and data files may also lie in DIR (repeatable; by default\n"
    "                     only files inside SOURCE_DIR are used; allow_dir=/ allows any)\n"
    "  -o force_share     read images without taking or checking QEMU's image locks (like\n"
    "                     qemu-img -U); implies -o ro\n"
    "  -o copy_on_read    reads of an image with a backing file also copy what they read\n"
    "                     from the backing chain into the image (per image without it:\n"
    "                     setfattr -n user.qcowfs.copy_on_read -v 1 NAME.raw)\n"
    "  -o threads=N       worker threads (default: number of CPUs, at least 2)\n"
    "  -o scan_interval=MS  how often SOURCE_DIR is scanned for added, removed and renamed\n"
    "                     images (default 400; 10 to 86400000). A request that finds an\n"
    "                     image moved since the last scan asks for a scan at once.\n"
    "  -o l2_cache=SIZE   L2 table cache per open image (default 4M; K, M, G suffixes)\n"
    "  -o compressed_cache=SIZE  decompressed clusters kept per open image (default 4M)\n"
    "  -o write_cache=SIZE  written data cached per writable open image (default 64M)\n"
    "  -o refcount_memory=SIZE  counters for a refcount rebuild or check (default 32M)\n"
    "  -o scan_limit=SIZE  metadata a refcount rebuild or check may read (default 1G)\n"
    "  -o readahead=SIZE  kernel readahead for the mount (default 0: the kernel's 128 KiB)\n"
    "  -o log=FILE        same as --log=FILE\n"
    "  -o OPT[,OPT...]    other options are passed to FUSE (allow_other, ...)\n"
    "  --log=FILE         append log lines to FILE (default: stderr with -f, else syslog)\n"
    "  -h, --help         show this help\n"
    "  -V, --version      show the version\n"
    "\n"
    "Unmount with: fusermount3 -u MOUNTPOINT\n";

struct Options {
    std::string source;
    std::string mountpoint;
    bool foreground = false;
    bool debug = false;
    bool read_only = false;
    unsigned threads = 0;
    unsigned scan_interval_ms = 400;
    size_t l2_cache = 4u << 20;
    size_t compressed_cache = 4u << 20;
    size_t write_cache = 64u << 20;
    size_t refcount_memory = 32u << 20;
    size_t scan_limit = size_t{1} << 30;
    size_t readahead = 0;
    std::string log_file;
    std::vector<std::string> allow_dirs;
    bool force_share = false;
    bool copy_on_read = false;
    std::vector<std::string> fuse_options;
};

[[noreturn]] void die(const std::string& message) {
    std::fprintf(stderr, "qcowfs: %s\n", message.c_str());
    std::exit(1);
}

size_t parse_size(const std::string& key, const std::string& text) {
    char* end = nullptr;
    errno = 0;
    unsigned long long v = std::strtoull(text.c_str(), &end, 10);
    if (errno || end == text.c_str()) die("invalid value for " + key + ": " + text);
    std::string suffix(end);
    if (suffix == "K" || suffix == "k") v <<= 10;
    else if (suffix == "M" || suffix == "m") v <<= 20;
    else if (suffix == "G" || suffix == "g") v <<= 30;
    else if (!suffix.empty()) die("invalid value for " + key + ": " + text);
    return static_cast<size_t>(v);
}

/// The -o options that take a SIZE, and where each goes.
constexpr std::pair<const char*, size_t Options::*> kSizeOptions[] = {
    {"l2_cache", &Options::l2_cache},
    {"readahead", &Options::readahead},
    {"compressed_cache", &Options::compressed_cache},
    {"write_cache", &Options::write_cache},
    {"refcount_memory", &Options::refcount_memory},
    {"scan_limit", &Options::scan_limit},
};

void parse_o(Options& o, const std::string& list) {
    std::stringstream ss(list);
    std::string opt;
    while (std::getline(ss, opt, ',')) {
        if (opt.empty()) continue;
        auto eq = opt.find('=');
        std::string key = opt.substr(0, eq), value = eq == std::string::npos ? "" : opt.substr(eq + 1);
        auto size_option = std::find_if(std::begin(kSizeOptions), std::end(kSizeOptions),
                                        [&](const auto& entry) { return key == entry.first; });
        if (opt == "ro") {
            o.read_only = true;
            o.fuse_options.push_back("ro");
        } else if (key == "threads") {
            o.threads = static_cast<unsigned>(parse_size(key, value));
        } else if (key == "scan_interval") {
            char* end = nullptr;
            errno = 0;
            unsigned long ms = std::strtoul(value.c_str(), &end, 10);
            if (errno || end == value.c_str() || *end != '\0' || ms < 10 || ms > 86400000)
                die("invalid value for scan_interval (milliseconds, 10 to 86400000): " + value);
            o.scan_interval_ms = static_cast<unsigned>(ms);
        } else if (size_option != std::end(kSizeOptions)) {
            o.*(size_option->second) = parse_size(key, value);
        } else if (key == "log") {
            o.log_file = value;
        } else if (key == "allow_dir") {
            if (value.empty()) die("allow_dir needs a directory");
            o.allow_dirs.push_back(value);
        } else if (opt == "copy_on_read") {
            o.copy_on_read = true;
        } else if (opt == "force_share") {
            o.force_share = true;
            if (!o.read_only) o.fuse_options.push_back("ro");
            o.read_only = true;
        } else {
            o.fuse_options.push_back(opt);
        }
    }
}

Options parse_args(int argc, char** argv) {
    Options o;
    std::vector<std::string> positional;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-h" || a == "--help") {
            std::fputs(kUsage, stdout);
            std::exit(0);
        } else if (a == "-V" || a == "--version") {
            std::printf("qcowfs %s (libfuse %s)\n", QCOWFS_VERSION, fuse_pkgversion());
            std::exit(0);
        } else if (a == "-f") {
            o.foreground = true;
        } else if (a == "-d") {
            o.debug = true;
        } else if (a == "-o") {
            if (++i >= argc) die("-o needs an argument");
            parse_o(o, argv[i]);
        } else if (a.rfind("-o", 0) == 0) {
            parse_o(o, a.substr(2));
        } else if (a.rfind("--log=", 0) == 0) {
            o.log_file = a.substr(6);
        } else if (a == "--log") {
            if (++i >= argc) die("--log needs a file name");
            o.log_file = argv[i];
        } else if (a.size() > 1 && a[0] == '-') {
            die("unknown option " + a + " (see qcowfs --help)");
        } else {
            positional.push_back(a);
        }
    }
    if (positional.size() != 2) die("expected SOURCE_DIR and MOUNTPOINT (see qcowfs --help)");
    o.source = positional[0];
    o.mountpoint = positional[1];
    return o;
}

std::string absolute_dir(const std::string& path, const char* what) {
    char resolved[PATH_MAX];
    if (!::realpath(path.c_str(), resolved)) die(std::string(what) + " " + path + ": " + std::strerror(errno));
    struct stat st;
    if (::stat(resolved, &st) != 0) die(std::string(what) + " " + path + ": " + std::strerror(errno));
    if (!S_ISDIR(st.st_mode)) die(std::string(what) + " " + path + ": " + std::strerror(ENOTDIR));
    return resolved;
}

/// Undoes the octal escapes (\040 ...) of /proc/self/mountinfo.
std::string unescape_mount_path(const std::string& s) {
    std::string out;
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '\\' && i + 3 < s.size()) {
            out += static_cast<char>(std::stoi(s.substr(i + 1, 3), nullptr, 8));
            i += 3;
        } else {
            out += s[i];
        }
    }
    return out;
}

/// The "major:minor" of the last mount at `path` in /proc/self/mountinfo, or "" if none.
std::string mount_device(const std::string& path) {
    std::ifstream in("/proc/self/mountinfo");
    std::string line, found;
    while (std::getline(in, line)) {
        std::istringstream fields(line);
        std::string id, parent, devno, root, mount_point;
        fields >> id >> parent >> devno >> root >> mount_point;
        if (unescape_mount_path(mount_point) == path) found = devno;
    }
    return found;
}

bool is_mount_point(const std::string& path) { return !mount_device(path).empty(); }

/// Sets the mount's readahead (-o readahead): FUSE starts at the kernel's 128 KiB default, and
/// the kernel ignores larger max_readahead values from FUSE_INIT. Not raised by default: a
/// reader that stops at a hole (cp --sparse) then had up to 3 MiB past each data extent read,
/// zero-filled and cached, 3.9 GiB of FUSE reads for 1 GiB of data; measured on Linux 6.18,
/// alternating, 1 MiB against 128 KiB: that cp 2.1-2.9 s against 1.3-1.7 s, sha256sum of a
/// 2 GiB disk 11.4-12.6 s against 7.0-9.3 s, dd bs=4M 1.3-1.7 s against 1.4-2.6 s. Read
/// from mountinfo, not stat(), which would send a request to this very process before it serves.
void set_readahead(const std::string& mountpoint, size_t bytes) {
    if (bytes == 0) return;
    std::string dev = mount_device(mountpoint);
    std::ofstream out("/sys/class/bdi/" + dev + "/read_ahead_kb");
    if (!dev.empty() && out) out << bytes / 1024 << std::endl;
    if (dev.empty() || !out) log::info("could not set readahead for " + mountpoint + " (not root?); using the kernel's");
}

/// Every open image holds a few descriptors (see io::UringFile): allow as many as the hard limit.
void raise_fd_limit() {
    struct rlimit rl;
    if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        ::setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/// Forks; the parent waits until the child reports the mount live (exit 0) or failed (exit 1).
/// Returns the fd the child writes its status to.
int daemonize_wait() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) die(std::string("pipe: ") + std::strerror(errno));
    pid_t pid = ::fork();
    if (pid < 0) die(std::string("fork: ") + std::strerror(errno));
    if (pid > 0) {
        ::close(fds[1]);
        char status = 1;
        ssize_t n;
        do n = ::read(fds[0], &status, 1);
        while (n < 0 && errno == EINTR);
        std::_Exit(n == 1 ? status : 1);
    }
    ::close(fds[0]);
    ::setsid();
    return fds[1];
}

/// Request buffers of up to 1 MiB are allocated and freed all the time. glibc would serve each
/// with a fresh mmap or give the heap's top back after it, so that every request paid page faults
/// for its buffer (a third of the daemon's CPU time in sequential writes, measured with perf).
/// Keep freed memory for reuse instead; the caches' own limits still bound what is in use.
void tune_allocator() {
    ::mallopt(M_MMAP_THRESHOLD, 32 << 20);
    ::mallopt(M_TRIM_THRESHOLD, 64 << 20);
    ::mallopt(M_TOP_PAD, 16 << 20);
}

void detach_stdio() {
    int null = ::open("/dev/null", O_RDWR);
    if (null < 0) return;
    ::dup2(null, 0);
    ::dup2(null, 1);
    ::dup2(null, 2);
    if (null > 2) ::close(null);
}


/// Makes the paths absolute and checks what must hold before mounting; sets up logging.
void check_before_mounting(Options& o) {
    o.source = absolute_dir(o.source, "source directory");
    o.mountpoint = absolute_dir(o.mountpoint, "mount point");
    for (auto& d : o.allow_dirs) d = absolute_dir(d, "allow_dir");
    if (is_mount_point(o.mountpoint)) die("mount point " + o.mountpoint + " is busy: something is already mounted there");
    if (::access("/dev/fuse", R_OK | W_OK) != 0) die(std::string("cannot open /dev/fuse: ") + std::strerror(errno));
    try {
        if (!o.log_file.empty()) log::configure(log::Sink::file, o.log_file);
    } catch (const std::system_error& e) {
        die(e.what());
    }
    log::set_debug(o.debug);
}

fs::FsOptions fs_options_of(const Options& o) {
    fs::FsOptions fs_options;
    fs_options.source_dir = o.source;
    fs_options.mountpoint = o.mountpoint;
    fs_options.read_only = o.read_only;
    fs_options.l2_cache_bytes = o.l2_cache;
    fs_options.compressed_cache_bytes = o.compressed_cache;
    fs_options.write_cache_bytes = o.write_cache;
    fs_options.allow_dirs = o.allow_dirs;
    fs_options.force_share = o.force_share;
    fs_options.copy_on_read = o.copy_on_read;
    fs_options.refcount_memory_bytes = o.refcount_memory;
    fs_options.scan_limit_bytes = o.scan_limit;
    fs_options.scan_interval_ms = o.scan_interval_ms;
    return fs_options;
}

/// A FUSE session serving `filesystem`, mounted on o.mountpoint; dies if that fails.
fuse_session* mount(const Options& o, fs::Filesystem& filesystem) {
    // FUSE options: ours first, the user's after them so they can override.
    std::vector<std::string> args = {"qcowfs", "-o", "default_permissions,fsname=" + o.source + ",subtype=qcowfs"};
    for (const auto& opt : o.fuse_options) {
        args.push_back("-o");
        args.push_back(opt);
    }
    std::vector<char*> argv_fuse;
    for (auto& a : args) argv_fuse.push_back(a.data());
    fuse_args fargs = FUSE_ARGS_INIT(static_cast<int>(argv_fuse.size()), argv_fuse.data());
    fuse_session* se = fuse_session_new(&fargs, &fs::Filesystem::operations(), sizeof(fuse_lowlevel_ops), &filesystem);
    fuse_opt_free_args(&fargs);
    if (!se) die("invalid FUSE options (see the message above)");
    if (fuse_session_mount(se, o.mountpoint.c_str()) != 0) {
        fuse_session_destroy(se);
        die("cannot mount on " + o.mountpoint);
    }
    return se;
}

/// Once mounted: a daemon leaves its terminal; the mount's device, readahead and the descriptor
/// limit are set up.
void after_mounting(const Options& o, fs::Filesystem& filesystem, bool daemon) {
    if (daemon) {
        if (o.log_file.empty()) log::configure(log::Sink::syslog);
        if (::chdir("/") != 0) { /* nothing depends on the working directory */ }
        detach_stdio();
    }
    if (std::string dev = mount_device(o.mountpoint); !dev.empty()) {
        unsigned major = 0, minor = 0;
        if (std::sscanf(dev.c_str(), "%u:%u", &major, &minor) == 2) filesystem.set_mount_device(makedev(major, minor));
    }
    set_readahead(o.mountpoint, o.readahead);
    raise_fd_limit();
    log::info("serving " + o.source + " on " + o.mountpoint);
    if (o.copy_on_read && o.read_only)
        log::info("copy_on_read: the mount is read-only, so nothing is copied");
    if (o.force_share)
        log::info("force_share: images are read without taking or checking QEMU's image locks; the mount is read-only");
}

/// Tells the parent of a daemon that the mount is live.
void report_ready(int ready_fd) {
    if (ready_fd < 0) return;
    char ok = 0;
    if (::write(ready_fd, &ok, 1) != 1) { /* the parent is gone; keep serving */ }
    ::close(ready_fd);
}

}  // namespace

int main(int argc, char** argv) {
    tune_allocator();
    Options o = parse_args(argc, argv);
    check_before_mounting(o);
    int ready_fd = o.foreground ? -1 : daemonize_wait();

    // One event loop per thread; every one reads requests from /dev/fuse and runs them.
    Workers workers(o.threads ? o.threads : std::max(2u, std::thread::hardware_concurrency()));
    fs::Filesystem filesystem(workers, fs_options_of(o));
    try {
        filesystem.initial_scan();
    } catch (const std::system_error& e) {
        die("source directory " + o.source + ": " + reason_of(e));
    }
    fuse_session* se = mount(o, filesystem);
    after_mounting(o, filesystem, ready_fd >= 0);

    asio::signal_set signals(workers.context(0), SIGINT, SIGTERM, SIGHUP);
    signals.async_wait([&](const boost::system::error_code& ec, int sig) {
        if (ec) return;
        log::info(std::string("received ") + ::strsignal(sig) + ", unmounting");
        filesystem.stop();
    });
    filesystem.start(se, [&] {
        signals.cancel();
        workers.stop();
    });
    report_ready(ready_fd);
    workers.run_all();

    fuse_session_unmount(se);
    fuse_session_destroy(se);
    log::info("unmounted " + o.mountpoint);
    return 0;
}
