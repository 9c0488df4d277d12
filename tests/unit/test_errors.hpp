// Test helpers for the error convention: what a call throws, as errno and as text.
#pragma once

#include <functional>
#include <string>
#include <system_error>

namespace qcowfs::test {

/// errno of the std::system_error `f` throws (0 if none); its message goes to `what` if given.
inline int thrown_errno(const std::function<void()>& f, std::string* what = nullptr) {
    try {
        f();
    } catch (const std::system_error& e) {
        if (what) *what = e.what();
        return e.code().value();
    }
    return 0;
}

/// Message of the std::system_error `f` throws ("" if none).
inline std::string thrown_message(const std::function<void()>& f) {
    std::string what;
    thrown_errno(f, &what);
    return what;
}

}  // namespace qcowfs::test
