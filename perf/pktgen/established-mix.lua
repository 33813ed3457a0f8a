-- Established-flow mix against a pktdist service: TCP ACK+PSH segments over a
-- fixed set of client flows (addresses x ports) to one VIP and port, as the
-- data phase of open connections looks on the wire, for a fixed time; then
-- pktgen's port statistics. pktdist routes a flow it has not seen open by
-- its affinities and then the consistent hash (SPEC section 2), so this load
-- needs no handshake first.
--
-- For pktgen-dpdk built with Lua (meson -Denable_lua=true), 22.x/23.x API:
--   pktgen <EAL args> -- -P -m "[1:2].0" -f perf/pktgen/established-mix.lua
-- or at the Pktgen prompt:  load perf/pktgen/established-mix.lua
--
-- Settings: edit the defaults below (and the shared ones in common.lua), or
-- export PKTGEN_<NAME> for any of them before starting pktgen (run-memif.sh
-- does that).

local common = dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "") .. "common.lua")

-- ---------------------------------------------------------------- settings
local settings = common.settings({
    SRC_IP_MIN   = "10.99.0.1",   -- client addresses...
    SRC_IP_MAX   = "10.99.3.232", -- ...up to (1000 clients)
    SRC_IP_INC   = "0.0.0.1",     -- step per packet
    SRC_PORT_MIN = 40000,         -- client ports...
    SRC_PORT_MAX = 40063,         -- ...up to (64 per client)
    SRC_PORT_INC = 1,             -- step per packet
    PKT_SIZE     = 256,           -- frame size with FCS
})
-- pktgen CLI commands for the TCP flags: pktgen's Lua range API has no TCP
-- flag setter, its command line does (22.x/23.x syntax; check `help range`
-- in yours). %s is the port.
local TCP_FLAG_COMMANDS = {
    "range %s tcp flag clr all",
    "range %s tcp flag set ack",
    "range %s tcp flag set psh",
}
-- -------------------------------------------------------------------------

common.tcp_range("established-mix", settings, {
    commands = TCP_FLAG_COMMANDS,
    name = "ACK+PSH",
    fallback = "still an established-flow load.",
})
