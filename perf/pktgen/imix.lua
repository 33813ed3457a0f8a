-- IMIX against a pktdist service: TCP ACK segments of 64, 594 and 1518
-- bytes in the proportion 7:4:1 (average 361.8 bytes) to one VIP and port,
-- sent as a 12-packet pktgen sequence, each slot its own client flow; for a
-- fixed time, then pktgen's port statistics. Sizes count the FCS, as
-- pktgen's do.
--
-- The slots are programmed with pktgen's `seq` command (pktgen.seqTable
-- programs only slot 0 in pktgen 23.10-24.10, and crashes 24.10 without a
-- tcp_flags field); the segments carry pktgen's default TCP flags, ACK.
--
-- For pktgen-dpdk built with Lua (meson -Denable_lua=true), 24.07.1 or newer:
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
    TX_BURST      = 24,                  -- packets per transmit burst: whole sequences
})
-- The sequence: 7 x 64, 4 x 594, 1 x 1518, interleaved so that large frames
-- do not come in bursts. pktgen holds at most 16 sequence packets.
local SIZES = { 64, 594, 64, 64, 594, 64, 1518, 64, 594, 64, 64, 594 }
-- -------------------------------------------------------------------------

common.main("imix", settings, function(s)
    if #SIZES > 16 then error("pktgen holds at most 16 sequence packets", 0) end
    local _, vtext = common.version()
    local PORT = s.PORT
    local counts, bytes = {}, 0
    for _, sz in ipairs(SIZES) do
        counts[sz] = (counts[sz] or 0) + 1
        bytes = bytes + sz
    end
    common.printf("imix: pktgen %s, port %s -> %s:%d (dst mac %s), TCP ACK, %d slots, one flow each:"
        .. " 64 x%d, 594 x%d, 1518 x%d, average %.1f bytes, rate %d%%, %d s",
        vtext, PORT, s.VIP, s.VIP_PORT, s.DST_MAC, #SIZES, counts[64] or 0,
        counts[594] or 0, counts[1518] or 0, bytes / #SIZES, s.RATE, s.DURATION)

    if s.QUIT then pktgen.screen("off") end
    pktgen.stop(PORT)
    pktgen.set_range(PORT, "off")
    pktgen.set(PORT, "count", 0)
    pktgen.set(PORT, "rate", s.RATE)
    -- pktgen writes each of its TX mbufs once, slot after slot, and sends
    -- the mbufs that come back to it: on a port that copies and frees at
    -- once (memif, pcap) always the same burst's worth. A burst of whole
    -- sequences keeps the mix exact there (close to it on a NIC, where more
    -- mbufs circulate).
    pktgen.set(PORT, "txburst", s.TX_BURST)

    local base = common.ip_to_int(s.SRC_IP_BASE)
    local commands, want = {}, {}
    for i, sz in ipairs(SIZES) do
        local src = common.int_to_ip(base + i - 1)
        local sport = s.SRC_PORT_BASE + i - 1
        commands[#commands + 1] = string.format(
            "seq %d %%s dst %s src %s dst %s src %s/32 sport %d dport %d ipv4 tcp vlan 1 size %d",
            i - 1, s.DST_MAC, s.SRC_MAC, s.VIP, src, sport, s.VIP_PORT, sz)
        -- As pktgen.save writes it back (a /32 source without its length).
        want[#want + 1] = string.format("seq %d %s %s %s %s %s %d %d ipv4 tcp 1 %d 0",
            i - 1, PORT, s.DST_MAC, s.SRC_MAC, s.VIP, src, sport, s.VIP_PORT, sz)
    end
    -- A non-zero sequence count puts the port in sequence mode.
    commands[#commands + 1] = "set %s seq_cnt " .. #SIZES
    want[#want + 1] = string.format("set %s seq_cnt %d", PORT, #SIZES)
    want[#want + 1] = string.format("set %s txburst %d", PORT, s.TX_BURST)
    if s.TX_BURST % #SIZES ~= 0 then
        common.printf("imix: WARNING: a TX burst of %d is not whole sequences of %d: the mix is off by up to one sequence per burst",
            s.TX_BURST, #SIZES)
    end
    common.cli(PORT, commands)
    common.expect_lines(common.saved(), want, "the sequence")

    common.send("imix", s)
    pktgen.set(PORT, "seq_cnt", 0)
end)
