// The coroutine vocabulary of the engine: Task<T> is an Asio awaitable; Executor is where it runs.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

namespace qcowfs {

namespace asio = boost::asio;

/// Every function that waits for I/O returns a Task and is co_awaited by its caller. Failure is
/// reported by throwing std::system_error (see format/error.hpp); nothing else is thrown.
template <class T = void>
using Task = asio::awaitable<T>;

using Executor = asio::any_io_executor;

}  // namespace qcowfs
