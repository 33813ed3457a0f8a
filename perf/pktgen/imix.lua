-- IMIX against a pktdist service: TCP segments of 64, 594 and 1518 bytes in
-- the proportion 7:4:1 (average 361.8 bytes) to one VIP and port, sent as a
-- 12-packet pktgen sequence, each slot its own client flow; for a fixed time,
-- then pktgen's port statistics. Sizes count the FCS, as pktgen's do.
--
-- For pktgen-dpdk built with Lua (meson -Denable_lua=true), 22.x/23.x API:
--   pktgen <EAL args> -- -P -m "[1:2].0" -f perf/pktgen/imix.lua
-- or at the Pktgen prompt:  load perf/pktgen/imix.lua
--
-- Settings: edit the defaults below (and the shared ones in common.lua), or
-- export PKTGEN_<NAME> for any of them before starting pktgen (run-memif.sh
-- does that).

local common = dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "") .. "common.lua")

-- ---------------------------------------------------------------- settings
local settings = common.settings({
    SRC_MAC       = "02:00:00:00:00:02", -- the pktgen port's MAC (required here)
    SRC_IP_BASE   = "10.98.0.1",         -- slot i sends from base + i
    SRC_PORT_BASE = 50000,               -- slot i sends from port base + i
})
-- The sequence: 7 x 64, 4 x 594, 1 x 1518, interleaved so that large frames
-- do not come in bursts. pktgen holds at most 16 sequence packets.
local SIZES = { 64, 594, 64, 64, 594, 64, 1518, 64, 594, 64, 64, 594 }
-- -------------------------------------------------------------------------

if type(pktgen) ~= "table" or type(pktgen.seqTable) ~= "function" then
    error("needs pktgen-dpdk's Lua API with pktgen.seqTable (pktgen 20.x or newer)")
end
if #SIZES > 16 then error("pktgen holds at most 16 sequence packets") end

local PORT = settings.PORT
local counts, bytes = {}, 0
for _, sz in ipairs(SIZES) do
    counts[sz] = (counts[sz] or 0) + 1
    bytes = bytes + sz
end
common.printf("imix: port %s -> %s:%d (dst mac %s), %d slots: 64 x%d, 594 x%d, 1518 x%d, average %.1f bytes, rate %d%%, %d s",
    PORT, settings.VIP, settings.VIP_PORT, settings.DST_MAC, #SIZES, counts[64] or 0,
    counts[594] or 0, counts[1518] or 0, bytes / #SIZES, settings.RATE, settings.DURATION)

if settings.QUIT then pktgen.screen("off") end
pktgen.stop(PORT)
if type(pktgen.set_range) == "function" then pktgen.set_range(PORT, "off") end
pktgen.set(PORT, "count", 0)
pktgen.set(PORT, "rate", settings.RATE)

local base = common.ip_to_int(settings.SRC_IP_BASE)
for i, sz in ipairs(SIZES) do
    pktgen.seqTable(i - 1, PORT, {
        eth_dst_addr = settings.DST_MAC,
        eth_src_addr = settings.SRC_MAC,
        ip_dst_addr = settings.VIP,
        ip_src_addr = common.int_to_ip(base + i - 1) .. "/24",
        sport = settings.SRC_PORT_BASE + i - 1,
        dport = settings.VIP_PORT,
        ethType = "ipv4",
        ipProto = "tcp",
        vlanid = 1,
        pktSize = sz,
        cos = 0,
        tos = 0,
        gtpu_teid = 0,
    })
end
-- A non-zero sequence count puts the port in sequence mode. The segments
-- carry pktgen's default TCP flags (ACK): data of open connections.
pktgen.set(PORT, "seq_cnt", #SIZES)

common.send("imix", settings)
pktgen.set(PORT, "seq_cnt", 0)

if settings.QUIT then pktgen.quit() end
