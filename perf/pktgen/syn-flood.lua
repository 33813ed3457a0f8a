-- SYN flood against a pktdist service: TCP SYNs (64-byte frames) from a range
-- of source addresses and ports to one VIP and port, for a fixed time, then
-- pktgen's port statistics.
--
-- For pktgen-dpdk built with Lua (meson -Denable_lua=true), 22.x/23.x API:
--   pktgen <EAL args> -- -P -m "[1:2].0" -f perf/pktgen/syn-flood.lua
-- or at the Pktgen prompt:  load perf/pktgen/syn-flood.lua
--
-- Settings: edit the defaults below (and the shared ones in common.lua), or
-- export PKTGEN_<NAME> for any of them before starting pktgen (run-memif.sh
-- does that).

local common = dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "") .. "common.lua")

-- ---------------------------------------------------------------- settings
local settings = common.settings({
    SRC_IP_MIN   = "198.18.0.1",     -- client addresses...
    SRC_IP_MAX   = "198.18.255.254", -- ...up to
    SRC_IP_INC   = "0.0.0.1",        -- step per packet
    SRC_PORT_MIN = 1024,             -- client ports...
    SRC_PORT_MAX = 65535,            -- ...up to
    SRC_PORT_INC = 1,                -- step per packet
    PKT_SIZE     = 64,               -- frame size with FCS
})
-- pktgen CLI commands for the TCP flags: pktgen's Lua range API has no TCP
-- flag setter, its command line does (22.x/23.x syntax; check `help range`
-- in yours). %s is the port.
local TCP_FLAG_COMMANDS = {
    "range %s tcp flag clr all",
    "range %s tcp flag set syn",
}
-- -------------------------------------------------------------------------

common.tcp_range("syn-flood", settings, {
    commands = TCP_FLAG_COMMANDS,
    name = "SYN",
    fallback = "which is not a SYN flood.",
})
