// canopy::control_server — the local control API: Cap'n Proto RPC
// (schemas/control.capnp) on a Unix socket, served on the io_thread, each
// method forwarded to node_control. This is what `canopyctl` talks to.
//
// Threading: construct, start() and stop() from one thread that is not the I/O
// thread (main()). The RPC connections live on the I/O thread; node_control's
// callbacks, which fire on arbitrary threads, hand their results back through
// cross-thread fulfillers and queues and never block. A subscription
// (followLogs, monitor) ends with node_control::unsubscribe() on the I/O thread
// when the client cancels the call, disconnects, or a call on its sink fails.
//
// Shutdown order: stop the control_server before the io_thread and before the
// node_control it borrows is destroyed.
#pragma once

#include "gateway/node_control.hpp"
#include "runtime/expected.hpp"

#include <cstddef>
#include <memory>
#include <string>

#include <sys/types.h>

namespace canopy {

class io_thread;

/// The default path of the control socket (overridden by --socket / CANOPY_SOCKET).
inline constexpr const char* default_control_socket = "/run/canopy/canopy.sock";

/// Limits of one subscription's hand-off queue (a slow client loses the excess,
/// and is told how many items it lost).
struct control_limits {
  std::size_t log_queue = 10000;       ///< log lines waiting for one followLogs client
  std::size_t record_queue = 4096;     ///< $upstream records waiting for one monitor client, plus the backlog
  std::size_t max_backlog = 100000;    ///< the most stored records one monitor call may ask for
};

/// Serves schemas/control.capnp on a Unix socket.
class control_server {
 public:
  /// A server for `socket_path`, forwarding to `node` (borrowed: it must outlive
  /// this server, or at least stop()). Nothing happens until start().
  control_server(std::string socket_path, node_control& node, control_limits limits = {});

  /// Calls stop().
  ~control_server();

  control_server(const control_server&) = delete;
  control_server& operator=(const control_server&) = delete;

  /// Creates the socket's parent directory if missing (mode 0755), replaces a
  /// stale socket file (one nobody listens on; any other kind of file, or a live
  /// socket, is an error naming the path), binds with mode 0660 and starts
  /// accepting on `io` (which must be running). Blocks until the socket listens.
  /// Errors: invalid_argument (path too long or empty), io_error (mkdir, bind,
  /// ...), unavailable (another process already serves this path).
  expected<void> start(io_thread& io);

  /// Stops accepting, closes every connection (ending its subscriptions, on the
  /// I/O thread) and removes the socket file if it is still ours. Blocks until
  /// done. Idempotent.
  void stop();

  /// The socket path given at construction.
  const std::string& socket_path() const noexcept { return path_; }

 private:
  struct impl;
  std::string path_;
  node_control& node_;
  control_limits limits_;
  io_thread* io_ = nullptr;
  std::unique_ptr<impl> impl_;
  dev_t socket_dev_ = 0;
  ino_t socket_ino_ = 0;
};

}  // namespace canopy
