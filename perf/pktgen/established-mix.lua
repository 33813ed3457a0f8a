-- Established-flow load against a pktdist service in pktgen's range mode:
-- TCP ACK+PSH segments (256-byte frames) from a range of client addresses
-- and ports to one VIP and port, as the data phase of open connections
-- looks on the wire, for a fixed time; then pktgen's port statistics.
-- pktdist routes a flow it has not seen open by its affinities and then the
-- consistent hash (SPEC section 2), so this load needs no handshake first.
--
-- Range mode sends few distinct flows (about 32 on memif or pcap ports; see
-- docs/pktgen.md), each of them many times.
--
-- For pktgen-dpdk built with Lua (meson -Denable_lua=true); the TCP flag
-- commands follow pktgen's version (24.07.1 and older, or 24.10.3 and newer;
-- 24.10.0-24.10.2 cannot set range-mode flags and are refused):
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
    SRC_PORT_MAX = 40063,         -- ...up to (64 ports; address and port step
                                  -- together: lcm(1000, 64) = 8000 pairs, 8 ports
                                  -- per client)
    SRC_PORT_INC = 1,             -- step per packet
    PKT_SIZE     = 256,           -- frame size with FCS
})
-- -------------------------------------------------------------------------

common.main("established-mix", settings, function(s)
    common.tcp_range("established-mix", s, { "ack", "psh" })
end)
