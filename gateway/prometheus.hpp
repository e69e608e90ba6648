// canopy::render_prometheus — a node's metrics as Prometheus text (exposition
// format 0.0.4), served on /metrics by every node (gateway/http_server.hpp).
// Plain C++: no CAF, no KJ. Names follow Azure IoT Edge's built-in metrics
// (edgeHub, edgeAgent: iotedge doc/BuiltInMetrics.md) where they mean the same
// thing; the rest are canopy_*.
//
// Every sample carries the label edge_device="<device_id>" (as edgeHub's do),
// and instance_number="<instance>" when the snapshot has one. Edge's third
// common label, iothub, is left out: a node knows its parent, not the hub's
// host name. Samples carry no timestamps (Prometheus's advice for exporters).
//
// Metric                                     type     labels                  source
// ------------------------------------------ -------- ----------------------- -------------------
// edgehub_messages_received_total            counter                          received
// edgehub_messages_sent_total                counter                          sent
// edgehub_messages_dropped_total             counter  reason=no_route         dropped_no_route
//                                                     reason=ttl_expiry       dropped_ttl_expiry
// edgehub_messages_unack_total               counter  reason=storage_failure  dropped_store_full
// edgehub_queue_length                       gauge    endpoint, priority      queues[].length
// edgehub_connected_clients                  gauge                            connected_clients
// edgehub_offline_count_total                counter  peer (the parent)       parent link's
//                                                                             disconnects
// edgehub_offline_duration_seconds           summary  peer (the parent)       _sum: parent link's
//                                                                             offline_ms_total,
//                                                                             _count: disconnects
// canopy_messages_redelivered_total          counter                          redelivered
// canopy_queue_checkpoint                    gauge    endpoint, priority      queues[].checkpoint
// canopy_store_size_bytes                    gauge                            store_bytes
// canopy_store_free_bytes                    gauge                            store_free_bytes
// canopy_store_limit_bytes                   gauge                            store_limit_bytes (if
//                                                                             set)
// canopy_store_commits_total                 counter                          commits
// canopy_store_commit_p50_seconds            gauge                            commit_p50_us
// canopy_store_commit_p99_seconds            gauge                            commit_p99_us
// canopy_store_commit_max_seconds            gauge                            commit_max_us
// canopy_module_restarts_total               counter  module_name,            restart_count
//                                                     module_version
// canopy_module_status                       gauge    module_name, status     status: 1 for the
//                                                                             current one, 0 for
//                                                                             the other known ones
// canopy_module_last_start_timestamp_seconds gauge    module_name             last_start_ms (if
//                                                                             any)
// canopy_module_last_exit_timestamp_seconds  gauge    module_name             last_exit_ms (if
//                                                                             any)
// canopy_link_up                             gauge    peer, role              up (1/0)
// canopy_link_rtt_seconds                    gauge    peer, role              rtt_us (if measured)
// canopy_link_connects_total                 counter  peer, role              connects
// canopy_link_disconnects_total              counter  peer, role              disconnects
// canopy_link_offline_seconds_total          counter  peer, role              offline_ms_total
// canopy_link_last_change_timestamp_seconds  gauge    peer, role              last_change_ms (if
//                                                                             any)
//
// Sources are fields of node_metrics (messages), module_row (modules),
// link_metrics (links) and metrics_snapshot. edgehub_messages_unack_total is
// edgeHub's count of messages refused because storage failed: here the store
// was full (or the disk). edgeHub's offline summary has quantiles; this one has
// only _sum and _count. Module states (running, stopped, failed, backoff,
// unhealthy) follow the "state set" pattern; an unknown state gets its own 1.
//
// Edge metrics with no Canopy source yet: edgehub_messages_received_total's
// route_output/id and edgehub_messages_sent_total's from/to labels (the router
// counts totals only), edgeAgent_module_start_total (module_row counts
// restarts, not starts; edgeAgent has no restart metric), and edgeHub's
// summaries of message sizes and durations.
#pragma once

#include "gateway/node_control.hpp"
#include "runtime/metrics.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace canopy {

/// The Content-Type of render_prometheus()'s text.
inline constexpr const char* prometheus_content_type = "text/plain; version=0.0.4; charset=utf-8";

/// Everything /metrics shows of one node, gathered by the caller.
struct metrics_snapshot {
  std::string device_id;                ///< this node's id: the edge_device label
  std::string instance_number;          ///< this run's id (changes on restart); "" = no label
  node_metrics messages;                ///< router and message store
  std::vector<module_row> modules;      ///< the deployment's modules
  std::vector<link_metrics> links;      ///< the parent link and the child links
  std::uint64_t connected_clients = 0;  ///< modules and leaf devices connected now
  std::int64_t now_ms =
    0;  ///< wall clock when gathered (not rendered: samples carry no timestamps)
};

/// Renders `s` in the Prometheus text format 0.0.4: each metric family once,
/// with one # HELP and one # TYPE line, label values escaped. Pure; any thread.
std::string render_prometheus(const metrics_snapshot& s);

}  // namespace canopy
