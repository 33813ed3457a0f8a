-- SYN flood over many distinct flows against a pktdist service: replays the
-- pcap file pktgen was started with (`-s 0:syn.pcap`, made by syn-pcap.py:
-- one SYN per flow, 1,000,000 flows by default) for a fixed time, then
-- pktgen's port statistics. pktgen sends the file's frames in turn, over
-- and over: every flow once per pass, so the first pass fills pktdist's flow
-- table and later passes repeat SYNs on flows it holds.
--
-- For pktgen-dpdk built with Lua (meson -Denable_lua=true), 24.07.1 or newer:
--   python3 perf/pktgen/syn-pcap.py --flows 1000000 /tmp/syn.pcap
--   pktgen <EAL args> -- -P -m "[1:2].0" -s 0:/tmp/syn.pcap -f perf/pktgen/syn-flood-pcap.lua
-- The frames are sent as they are in the file: make it with the VIP, port
-- and MACs of your set-up (syn-pcap.py --help).
--
-- Settings: the shared ones in common.lua (PORT, RATE, DURATION, QUIT), or
-- export PKTGEN_<NAME> before starting pktgen (run-memif.sh does that).

local common = dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "") .. "common.lua")

local settings = common.settings({})

common.main("syn-flood-pcap", settings, function(s)
    local _, vtext = common.version()
    local PORT = s.PORT
    pktgen.stop(PORT)
    pktgen.set_range(PORT, "off")
    -- pktgen 24.10 and later start with the file loaded but not sending it.
    pktgen.pcap(PORT, "on")
    local lines, ordered = common.saved()
    if not lines[string.format("enable %s pcap", PORT)] then
        error("no pcap file on port " .. PORT .. ": start pktgen with -s " .. PORT
            .. ":<file.pcap> (made by perf/pktgen/syn-pcap.py)", 0)
    end
    -- pktgen notes the file's frame count in the configuration it saves.
    local frames, here = "?", false
    for _, l in ipairs(ordered) do
        local p = l:match("^# PCAP port (%d+)")
        if p then here = (p == tostring(PORT)) end
        local n = here and l:match("^#%s+Packet count: (%d+)")
        if n then frames = n end
    end
    common.printf("syn-flood-pcap: pktgen %s, port %s replays its pcap file (%s frames), rate %d%%, %d s",
        vtext, PORT, frames, s.RATE, s.DURATION)

    if s.QUIT then pktgen.screen("off") end
    pktgen.set(PORT, "count", 0)
    pktgen.set(PORT, "rate", s.RATE)
    common.send("syn-flood-pcap", s)
end)
