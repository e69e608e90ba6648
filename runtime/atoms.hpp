// Message tags shared by the node's actors (CAF 0.17 atoms: at most 10 chars).
// Internal to the node; modules never see CAF.
#pragma once

#include <caf/atom.hpp>

namespace canopy::atoms {

// supervisor protocol (runtime/supervisor.hpp)
using add_child = caf::atom_constant<caf::atom("addchild")>;
using remove_child = caf::atom_constant<caf::atom("rmchild")>;
using restart_child = caf::atom_constant<caf::atom("rstchild")>;
using which_children = caf::atom_constant<caf::atom("children")>;
using child_event = caf::atom_constant<caf::atom("childevt")>;
using health_ping = caf::atom_constant<caf::atom("hping")>;
using health_pong = caf::atom_constant<caf::atom("hpong")>;
using tick = caf::atom_constant<caf::atom("tick")>;  // a clock callback fired

// module host (actors/module_host.hpp)
using input = caf::atom_constant<caf::atom("input")>;
using method = caf::atom_constant<caf::atom("method")>;
using desired = caf::atom_constant<caf::atom("desired")>;
using timer = caf::atom_constant<caf::atom("timer")>;
using finish = caf::atom_constant<caf::atom("finish")>;

// router (runtime/router.hpp)
using route_msg = caf::atom_constant<caf::atom("route")>;
using set_routes = caf::atom_constant<caf::atom("setroutes")>;
using module_up = caf::atom_constant<caf::atom("moduleup")>;
using modules_ready = caf::atom_constant<caf::atom("modsready")>;
using subscribe = caf::atom_constant<caf::atom("subscribe")>;
using stats = caf::atom_constant<caf::atom("stats")>;
using inject = caf::atom_constant<caf::atom("inject")>;
using delivered = caf::atom_constant<caf::atom("delivered")>;
using nack = caf::atom_constant<caf::atom("nack")>;
using resume = caf::atom_constant<caf::atom("resume")>;
using committed = caf::atom_constant<caf::atom("committed")>;

// links between nodes (actors/parent_link.hpp, actors/fleet.hpp)
using link_up = caf::atom_constant<caf::atom("linkup")>;
using link_down = caf::atom_constant<caf::atom("linkdown")>;
using uploaded = caf::atom_constant<caf::atom("uploaded")>;
using ping = caf::atom_constant<caf::atom("ping")>;
using pong = caf::atom_constant<caf::atom("pong")>;
using connect = caf::atom_constant<caf::atom("connect")>;
using uplink = caf::atom_constant<caf::atom("uplink")>;

// agent (runtime/agent.hpp) and control
using deploy = caf::atom_constant<caf::atom("deploy")>;
using list = caf::atom_constant<caf::atom("list")>;
using restart = caf::atom_constant<caf::atom("restart")>;
using invoke = caf::atom_constant<caf::atom("invoke")>;
using twin = caf::atom_constant<caf::atom("twin")>;
using reported = caf::atom_constant<caf::atom("reported")>;
using stop = caf::atom_constant<caf::atom("stop")>;

// store (runtime/store_actor)
using put = caf::atom_constant<caf::atom("put")>;
using get = caf::atom_constant<caf::atom("get")>;
using forget = caf::atom_constant<caf::atom("forget")>;
using unsubscribe = caf::atom_constant<caf::atom("unsub")>;
using flush = caf::atom_constant<caf::atom("flush")>;
using query = caf::atom_constant<caf::atom("query")>;

}  // namespace canopy::atoms
