// The node's message metrics (issue 3): what `canopyctl metrics` shows. Kept
// by the router (runtime/router.hpp) and its message store; CAF-free so the
// control socket and tools can use it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace canopy {

/// One queue: a lane (endpoint, priority) of the message store.
struct queue_metrics {
  std::string endpoint;        ///< "$upstream" or "/modules/{id}/inputs/{name}"
  int priority = 0;            ///< 0 (most urgent) .. 9
  std::int64_t length = 0;     ///< undelivered messages: not yet acknowledged by the receiver
  std::int64_t checkpoint = 0; ///< last acknowledged seq (persisted)
  std::int64_t last_seq = 0;   ///< highest seq given to a stored message
};

/// One link between two nodes of the tree (issue 4), as one end sees it.
struct link_metrics {
  std::string peer;                   ///< the other node's id (its certificate's subject CN)
  std::string role;                   ///< "parent" (the link to our parent) | "child"
  bool up = false;                    ///< connected and authenticated now
  std::int64_t rtt_us = 0;            ///< last measured round-trip time; 0 = none yet
  std::uint64_t connects = 0;         ///< successful connections since start
  std::uint64_t disconnects = 0;      ///< connections lost since start
  std::int64_t offline_ms_total = 0;  ///< time spent down since start (parent link), until now
  std::int64_t last_change_ms = 0;    ///< wall clock (ms since epoch) of the last up/down change
  std::string last_error;             ///< why the last attempt or connection failed ("" = none)
};

/// Counters since the node (router) started, and the store's state now.
struct node_metrics {
  std::uint64_t received = 0;            ///< messages that entered the router
  std::uint64_t sent = 0;                ///< deliveries acknowledged by their receiver
  std::uint64_t dropped_no_route = 0;    ///< matched no route
  std::uint64_t dropped_ttl_expiry = 0;  ///< expired before delivery (one per endpoint)
  std::uint64_t dropped_store_full = 0;  ///< refused: the store hit its size limit or the disk is full
  std::uint64_t redelivered = 0;         ///< delivered again after a restart (possible duplicates)
  std::vector<queue_metrics> queues;     ///< every lane, by endpoint then priority
  std::int64_t store_bytes = 0;          ///< size of messages.db (without its WAL)
  std::int64_t store_free_bytes = 0;     ///< of which free pages (reused before the file grows)
  std::int64_t store_limit_bytes = 0;    ///< configured size limit; 0 = none
  std::uint64_t commits = 0;             ///< group commits (transactions with fsync) since start
  std::int64_t commit_p50_us = 0;        ///< commit latency over the recent commits
  std::int64_t commit_p99_us = 0;
  std::int64_t commit_max_us = 0;
  std::vector<link_metrics> links;       ///< the parent link and child links (issue 4)
  std::uint64_t refused_messages = 0;    ///< uploads of children outside their subtree
};

}  // namespace canopy
