-- Runs one of the pktgen scripts against a stand-in for pktgen-dpdk and
-- checks what it made pktgen do. The stand-in models one release's Lua API
-- and the parts of its command grammar the scripts use, as read from that
-- release's source (app/cli-functions.c, app/pktgen-cmds.c):
--
--   24.07.1  range <p> tcp flag set|clr <flag>   (one flag per command)
--   24.10.0  range <p> tcp flag clr <x> clears every flag; `tcp flag set`
--            and `tcp flags` are refused: range-mode flags cannot be set
--   24.10.3  range <p> tcp flag|flags <comma list>
--
-- plus `seq <n> <p> dst <mac> src <mac> dst <ip> src <ip/len> sport <n>
-- dport <n> ipv4 tcp vlan <n> size <n>` and `set <p> seq_cnt <n>`. Like
-- pktgen, it reports a command it does not know ("Invalid line") and goes
-- on; pktgen.save writes the configuration back in the release's grammar.
-- So a script that uses the wrong grammar, or does not check what pktgen
-- took, fails here as it would against the real pktgen. It tests the
-- scripts, not pktgen: check.sh with PKTGEN=... runs the real one.
--
--   lua5.3 perf/pktgen/test/mock-run.lua perf/pktgen/syn-flood.lua syn 24.07.1
--
-- The second argument names the expectations: syn, established, imix,
-- pcap (the stand-in holds a loaded pcap file) or pcap-missing (it holds
-- none: the script must refuse). Exit status 0 when every check holds.

local script, kind, version = arg[1], arg[2], arg[3]
assert(script and kind and version,
    "usage: mock-run.lua SCRIPT syn|established|imix|pcap|pcap-missing 24.07.1|24.10.0|24.10.3")
local V = {}
for n in version:gmatch("%d+") do V[#V + 1] = tonumber(n) end
local function older(a, b, c)
    local want = { a, b, c }
    for i = 1, 3 do
        if V[i] ~= want[i] then return V[i] < want[i] end
    end
    return false
end

local FLAGS = { fin = 1, syn = 2, rst = 4, psh = 8, ack = 16, urg = 32, ece = 64, cwr = 128 }
local FLAG_ORDER = { "urg", "ack", "psh", "rst", "syn", "fin" }

-- pktgen's state for port 0 (the scripts use the one port).
local st = {
    size = 64, rate = 100, count = 0, txburst = 32, proto = "tcp",
    range_on = false, range_proto = "tcp", range_flags = FLAGS.ack,
    range = {}, seq = {}, seq_cnt = 0,
    pcap_frames = (kind == "pcap") and 5000 or nil, pcap_on = false,
}
local invalid = {}        -- command lines the stand-in refused
local at_start = nil      -- copy of the state when traffic started
local starts, stops, quit = 0, 0, false
local tx, started = 0, false

local function copy(t)
    if type(t) ~= "table" then return t end
    local c = {}
    for k, v in pairs(t) do c[k] = copy(v) end
    return c
end

local function port0(p)
    assert(tostring(p) == "0", "the scripts drive port 0 by default, not " .. tostring(p))
end

local function flags_from_list(list)
    local f = 0
    for x in list:gmatch("[^,]+") do
        if x == "clr" then return 0 end
        if FLAGS[x] then f = f | FLAGS[x] end
    end
    return f
end

-- One command line, in this release's grammar.
local function command(line)
    local w = {}
    for x in line:gmatch("%S+") do w[#w + 1] = x end
    if #w == 0 or w[1]:sub(1, 1) == "#" then return end
    local ok = false
    if w[1] == "range" and w[3] == "tcp" and (w[4] == "flag" or w[4] == "flags") then
        if older(24, 10, 0) then
            if #w == 6 and w[4] == "flag" and (FLAGS[w[6]] or w[6] == "all") then
                local bits = w[6] == "all" and 0xff or FLAGS[w[6]]
                if w[5] == "set" then
                    st.range_flags = st.range_flags | bits
                    ok = true
                elseif w[5] == "clr" then
                    st.range_flags = st.range_flags & ~bits
                    ok = true
                end
            end
        elseif older(24, 10, 3) then
            -- `range %P tcp flag clr %|...` calls the new setter with "clr".
            if #w == 6 and w[4] == "flag" and w[5] == "clr" then
                st.range_flags = 0
                ok = true
            end
        elseif #w == 5 then
            st.range_flags = flags_from_list(w[5])
            ok = true
        end
    elseif (w[1] == "seq" or w[1] == "sequence") and #w == 21 and w[4] == "dst" and w[6] == "src"
        and w[8] == "dst" and w[10] == "src" and w[12] == "sport" and w[14] == "dport"
        and w[16] == "ipv4" and w[17] == "tcp" and w[18] == "vlan" and w[20] == "size" then
        local n = tonumber(w[2])
        if n and n < 16 and w[11]:find("/") then
            port0(w[3])
            st.seq[n] = { dmac = w[5], smac = w[7], dip = w[9], sip = w[11]:match("^[^/]+"),
                sport = tonumber(w[13]), dport = tonumber(w[15]), vlan = tonumber(w[19]),
                size = tonumber(w[21]) }
            ok = true
        end
    elseif w[1] == "set" and w[3] == "seq_cnt" and #w == 4 then
        st.seq_cnt = tonumber(w[4])
        ok = true
    end
    if not ok then invalid[#invalid + 1] = line end
end

local function save(path)
    local f = assert(io.open(path, "w"))
    local function out(fmt, ...) f:write(string.format(fmt, ...), "\n") end
    out("# Pktgen %s", version)
    out("set 0 size %d", st.size)
    out("set 0 rate %g", st.rate)
    out("set 0 txburst %d", st.txburst)
    out("%sable 0 pcap", st.pcap_on and "en" or "dis")
    out("%sable 0 range", st.range_on and "en" or "dis")
    for _, what in ipairs({ "src mac", "dst mac", "src ip", "dst ip", "src port", "dst port", "size" }) do
        local r = st.range[what] or {}
        for _, k in ipairs({ "start", "min", "max", "inc" }) do
            out("range 0 %s %s %s", what, k, tostring(r[k] or 0))
        end
    end
    out("range 0 proto %s", st.range_proto)
    if older(24, 10, 0) then
        out("range 0 tcp flag clr all")
        for _, name in ipairs(FLAG_ORDER) do
            if st.range_flags & FLAGS[name] ~= 0 then out("range 0 tcp flag set %s", name) end
        end
    else
        local names = {}
        for _, name in ipairs({ "cwr", "ece", "urg", "ack", "psh", "rst", "syn", "fin" }) do
            if st.range_flags & FLAGS[name] ~= 0 then names[#names + 1] = name end
        end
        out("range 0 tcp flags %s", #names > 0 and table.concat(names, ",") or "clr")
    end
    out("set 0 seq_cnt %d", st.seq_cnt)
    for n = 0, st.seq_cnt - 1 do
        local s = st.seq[n] or { dmac = "00:00:00:00:00:00", smac = "00:00:00:00:00:00",
            dip = "0.0.0.0", sip = "0.0.0.0", sport = 0, dport = 0, vlan = 1, size = 64 }
        out("seq %d 0 %s %s %s %s %d %d ipv4 tcp %d %d 0", n, s.dmac, s.smac, s.dip, s.sip,
            s.sport, s.dport, s.vlan, s.size)
    end
    if st.pcap_frames then
        out("#\n# PCAP port 0\n#    Packet count: %d", st.pcap_frames)
    end
    f:close()
end

local function range_setter(what)
    return function(p, which, value)
        port0(p)
        assert(({ start = 1, min = 1, max = 1, inc = 1 })[which], "range field " .. tostring(which))
        st.range[what] = st.range[what] or {}
        st.range[what][which] = value
    end
end

pktgen = {
    info = { Pktgen_Version = "Pktgen " .. version },
    set = function(p, what, v)
        port0(p)
        if what == "seq_cnt" then st.seq_cnt = v
        elseif what == "count" or what == "size" or what == "rate" or what == "txburst" then st[what] = v
        else error("stand-in: pktgen.set " .. tostring(what) .. " not modelled") end
    end,
    set_proto = function(p, proto) port0(p); st.proto = proto end,
    set_range = function(p, onoff)
        port0(p)
        st.range_on = (onoff == "on" or onoff == "enable")
    end,
    pcap = function(p, onoff)
        port0(p)
        if st.pcap_frames then st.pcap_on = (onoff == "on" or onoff == "enable") end
    end,
    -- As observed with the real releases: 24.10 crashes on an entry without
    -- tcp_flags, and 23.10-24.10 program only slot 0 (the others keep
    -- pktgen's default packet).
    seqTable = function(n, p, t)
        port0(p)
        if not older(24, 10, 0) and t.tcp_flags == nil then
            error("Pktgen got a Segment Fault (seqTable entry without tcp_flags)")
        end
        if n == 0 or older(23, 10, 0) then
            st.seq[n] = { dmac = t.eth_dst_addr, smac = t.eth_src_addr, dip = t.ip_dst_addr,
                sip = tostring(t.ip_src_addr):match("^[^/]+"), sport = t.sport, dport = t.dport,
                vlan = t.vlanid, size = t.pktSize }
        end
    end,
    screen = function() end,
    clr = function() tx = 0 end,
    start = function(p)
        port0(p)
        starts = starts + 1
        started = true
        at_start = copy(st)
    end,
    stop = function(p)
        port0(p)
        if started then stops = stops + 1 end
        started = false
    end,
    delay = function(ms) if started then tx = tx + ms * 1000 end end,
    quit = function() quit = true end,
    portStats = function(p)
        if older(23, 0, 0) then return nil end
        return { [tonumber(p)] = { opackets = tx, ipackets = 0 }, n = 1 }
    end,
    load = function(path)
        assert(path:match("%.pkt$"), "command file must end in .pkt: " .. path)
        for line in io.lines(path) do command(line) end
    end,
    save = save,
    range = {
        dst_mac = range_setter("dst mac"), src_mac = range_setter("src mac"),
        dst_ip = range_setter("dst ip"), src_ip = range_setter("src ip"),
        dst_port = range_setter("dst port"), src_port = range_setter("src port"),
        pkt_size = range_setter("size"),
        ip_proto = function(p, proto) port0(p); st.range_proto = proto end,
    },
}

local result = os.tmpname()
os.remove(result)
local env_result = os.getenv("PKTGEN_RESULT")
assert(env_result == nil or env_result == "", "run without PKTGEN_RESULT: the stand-in sets it")
-- The scripts read PKTGEN_RESULT through os.getenv: give them ours.
local real_getenv = os.getenv
os.getenv = function(name)
    if name == "PKTGEN_RESULT" then return result end
    return real_getenv(name)
end

local real_print = print
local out = {}
print = function(...)
    local parts = {}
    for i = 1, select("#", ...) do parts[#parts + 1] = tostring(select(i, ...)) end
    out[#out + 1] = table.concat(parts, "\t")
end
local ran, err = pcall(dofile, script)
print = real_print
os.getenv = real_getenv
for _, l in ipairs(out) do print("  | " .. l) end

local failures = 0
local function check(cond, what)
    if cond then
        print("ok   " .. what)
    else
        print("FAIL " .. what)
        failures = failures + 1
    end
end

local rf = io.open(result)
local res = rf and rf:read("a") or ""
if rf then rf:close() end
os.remove(result)

local env = function(n, d) local v = real_getenv(n); if v == nil or v == "" then return d end; return v end
local vip = env("PKTGEN_VIP", "192.0.2.10")
local vport = tonumber(env("PKTGEN_VIP_PORT", "80"))
local dur = tonumber(env("PKTGEN_DURATION", "30"))
local want_quit = env("PKTGEN_QUIT", "0") == "1"

check(quit == want_quit, "quits exactly when PKTGEN_QUIT=1")
check(#invalid == 0, "every command in this release's grammar"
    .. (#invalid > 0 and (": refused " .. table.concat(invalid, "; ")) or ""))

-- Scripts this release cannot run must say so and send nothing.
local refuse = nil
if (kind == "syn" or kind == "established") and not older(24, 10, 0) and older(24, 10, 3) then
    refuse = "cannot set TCP flags in range mode"
elseif kind == "pcap-missing" then
    refuse = "no pcap file on port 0"
end
if refuse then
    check(not ran, "the script fails")
    check(res:find("^error: ") ~= nil and res:find(refuse, 1, true) ~= nil,
        "PKTGEN_RESULT says why: " .. refuse)
    local said = false
    for _, l in ipairs(out) do if l:find("ERROR: ", 1, true) and l:find(refuse, 1, true) then said = true end end
    check(said, "prints the reason as an ERROR line")
    check(starts == 0, "sends nothing")
else
    check(ran, "the script runs to its end" .. (ran and "" or (": " .. tostring(err))))
    check(res == "ok\n", "PKTGEN_RESULT says ok")
    check(starts == 1 and stops >= 1 and not started, "traffic started once on port 0 and stopped")
    check(tx == dur * 1000000, "ran for PKTGEN_DURATION=" .. dur .. " s of pktgen.delay")
    local saw_stats = false
    for _, l in ipairs(out) do if l:match("opackets = ") then saw_stats = true end end
    check(saw_stats, "printed the port statistics")
    local s = at_start or st

    local function range_is(what, start, max, inc)
        local r = s.range[what] or {}
        return tostring(r.start) == tostring(start) and tostring(r.min) == tostring(start)
            and tostring(r.max) == tostring(max) and tostring(r.inc) == tostring(inc)
    end
    if kind == "syn" or kind == "established" then
        check(s.range_on, "range mode on at start")
        check(s.range_proto == "tcp", "range protocol TCP")
        check(range_is("dst ip", vip, vip, "0.0.0.0"), "destination is the VIP " .. vip .. " only")
        check(range_is("dst port", vport, vport, 0), "destination port " .. vport .. " only")
        check(s.range["src ip"] and s.range["src ip"].inc == "0.0.0.1", "source addresses advance")
        check(s.range["src port"] and tostring(s.range["src port"].inc) == "1", "source ports advance")
    end
    if kind == "syn" then
        check(s.range_flags == FLAGS.syn, "range packets carry SYN alone")
        check(range_is("size", 64, 64, 0), "64-byte frames")
        check(s.range["src port"] and tostring(s.range["src port"].max) == "65535", "source ports up to 65535")
    elseif kind == "established" then
        check(s.range_flags == FLAGS.ack | FLAGS.psh, "range packets carry ACK+PSH")
        check(range_is("size", 256, 256, 0), "256-byte frames")
    elseif kind == "imix" then
        check(not s.range_on, "range mode off")
        check(s.seq_cnt == 12, "sequence of 12 slots at start")
        check(s.txburst % 12 == 0, "TX burst of whole sequences (" .. s.txburst .. ")")
        local sizes, srcs, distinct, to_vip = {}, {}, 0, true
        for n = 0, 11 do
            local q = s.seq[n]
            if q then
                sizes[q.size] = (sizes[q.size] or 0) + 1
                local k = q.sip .. ":" .. q.sport
                if not srcs[k] then distinct = distinct + 1 end
                srcs[k] = true
                to_vip = to_vip and q.dip == vip and q.dport == vport
            end
        end
        check(sizes[64] == 7 and sizes[594] == 4 and sizes[1518] == 1, "slot sizes 64:594:1518 = 7:4:1")
        check(distinct == 12, "each slot its own client flow")
        check(to_vip, "every slot goes to " .. vip .. ":" .. vport)
    elseif kind == "pcap" then
        check(s.pcap_on, "pcap replay on at start")
        check(not s.range_on, "range mode off")
    end
end

if failures > 0 then
    print(failures .. " check(s) failed for " .. script .. " against the pktgen " .. version .. " stand-in")
    os.exit(1)
end
print("all checks passed for " .. script .. " against the pktgen " .. version .. " stand-in")
