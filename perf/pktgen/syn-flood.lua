-- SYN flood against a pktdist service in pktgen's range mode: TCP SYNs
-- (64-byte frames) from a range of source addresses and ports to one VIP
-- and port, for a fixed time, then pktgen's port statistics.
--
-- Range mode sends few distinct flows (about 32 on memif or pcap ports; see
-- docs/pktgen.md): it loads the SYN path (scheduler, affinity lookup), not
-- the flow table's inserts. For a flood over many distinct flows, replay a
-- pcap with syn-flood-pcap.lua.
--
-- For pktgen-dpdk built with Lua (meson -Denable_lua=true); the TCP flag
-- commands follow pktgen's version (24.07.1 and older, or 24.10.3 and newer;
-- 24.10.0-24.10.2 cannot set range-mode flags and are refused):
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
-- -------------------------------------------------------------------------

common.main("syn-flood", settings, function(s)
    common.tcp_range("syn-flood", s, { "syn" })
end)
