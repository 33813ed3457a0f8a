-- Runs one of the pktgen scripts against a stand-in for pktgen-dpdk's Lua API
-- and checks what it asked pktgen to do. This tests the scripts' logic (their
-- settings, the calls and command lines they produce), not pktgen itself.
--
--   lua5.3 perf/pktgen/test/mock-run.lua perf/pktgen/syn-flood.lua syn
--
-- The second argument names the expectations: syn, established or imix.
-- Exit status 0 when every check holds.

local script, kind = arg[1], arg[2]
assert(script and kind, "usage: mock-run.lua SCRIPT syn|established|imix")

local calls = {}      -- every API call, in order: {name, args...}
local cli_lines = {}  -- lines of command files given to pktgen.load
local tx = 0          -- transmitted packets, grows while "started"
local started = false
local quit = false

local function record(name)
    return function(...)
        calls[#calls + 1] = { name, ... }
    end
end

pktgen = {
    set = record("set"),
    set_proto = record("set_proto"),
    set_range = record("set_range"),
    seqTable = record("seqTable"),
    screen = record("screen"),
    clr = function() calls[#calls + 1] = { "clr" }; tx = 0 end,
    start = function(p) calls[#calls + 1] = { "start", p }; started = true end,
    stop = function(p) calls[#calls + 1] = { "stop", p }; started = false end,
    delay = function(ms) if started then tx = tx + ms * 1000 end end,
    quit = function() quit = true end,
    portStats = function(port, what)
        return { [tonumber(port)] = { opackets = tx, ipackets = 0 }, n = 1 }
    end,
    load = function(path)
        assert(path:match("%.pkt$"), "command file must end in .pkt: " .. path)
        local f = assert(io.open(path))
        for line in f:lines() do cli_lines[#cli_lines + 1] = line end
        f:close()
        calls[#calls + 1] = { "load", path }
    end,
    range = {},
}
for _, f in ipairs({ "dst_mac", "src_mac", "dst_ip", "src_ip", "ip_proto", "dst_port",
    "src_port", "pkt_size", "ttl" }) do
    pktgen.range[f] = record("range." .. f)
end

local real_print = print
local out = {}
print = function(...)
    local parts = {}
    for i = 1, select("#", ...) do parts[#parts + 1] = tostring(select(i, ...)) end
    out[#out + 1] = table.concat(parts, "\t")
end

local ok, err = pcall(dofile, script)
print = real_print
for _, l in ipairs(out) do print("  | " .. l) end
if not ok then
    print("FAIL " .. script .. ": " .. tostring(err))
    os.exit(1)
end

local failures = 0
local function check(cond, what)
    if cond then
        print("ok   " .. what)
    else
        print("FAIL " .. what)
        failures = failures + 1
    end
end

-- Index of the first call matching name and (optionally) leading arguments.
local function find(name, ...)
    local want = { ... }
    for i, c in ipairs(calls) do
        if c[1] == name then
            local match = true
            for j, w in ipairs(want) do
                if tostring(c[j + 1]) ~= tostring(w) then match = false end
            end
            if match then return i, c end
        end
    end
    return nil
end

local function has_line(l)
    for _, x in ipairs(cli_lines) do if x == l then return true end end
    return false
end

local vip = os.getenv("PKTGEN_VIP") or "192.0.2.10"
local vport = os.getenv("PKTGEN_VIP_PORT") or "80"
local dur = tonumber(os.getenv("PKTGEN_DURATION") or "30")

local i_start = find("start", "0")
local i_stop = i_start and (function()
    for i = i_start + 1, #calls do if calls[i][1] == "stop" then return i end end
end)()
check(i_start ~= nil, "traffic started on port 0")
check(i_stop ~= nil, "traffic stopped after it started")
check(tx == dur * 1000000, "ran for PKTGEN_DURATION=" .. dur .. " s of pktgen.delay")
check(quit == (os.getenv("PKTGEN_QUIT") == "1"), "quits exactly when PKTGEN_QUIT=1")
local saw_stats = false
for _, l in ipairs(out) do if l:match("opackets = ") then saw_stats = true end end
check(saw_stats, "printed the port statistics")

if kind == "syn" or kind == "established" then
    check(find("range.dst_ip", "0", "start", vip) ~= nil, "destination is the VIP " .. vip)
    check(find("range.dst_ip", "0", "inc", "0.0.0.0") ~= nil, "destination address fixed")
    check(find("range.dst_port", "0", "start", vport) ~= nil, "destination port " .. vport)
    check(find("range.dst_port", "0", "inc", 0) ~= nil, "destination port fixed")
    check(find("range.ip_proto", "0", "tcp") ~= nil, "range protocol TCP")
    check(find("range.src_ip", "0", "inc", "0.0.0.1") ~= nil, "source addresses advance")
    check(find("range.src_port", "0", "inc", 1) ~= nil, "source ports advance")
    local i_on = find("set_range", "0", "on")
    check(i_on ~= nil and i_on < i_start, "range mode on before start")
    check(has_line("range 0 tcp flag clr all"), "TCP flags cleared first")
    local i_load = find("load")
    check(i_load ~= nil and i_load < i_start, "flags set before start")
end
if kind == "syn" then
    check(has_line("range 0 tcp flag set syn"), "SYN flag set")
    check(not has_line("range 0 tcp flag set ack"), "no ACK flag")
    check(find("range.pkt_size", "0", "start", 64) ~= nil, "64-byte frames")
    check(find("range.src_port", "0", "max", 65535) ~= nil, "source ports up to 65535")
elseif kind == "established" then
    check(has_line("range 0 tcp flag set ack"), "ACK flag set")
    check(has_line("range 0 tcp flag set psh"), "PSH flag set")
    check(not has_line("range 0 tcp flag set syn"), "no SYN flag")
elseif kind == "imix" then
    local sizes, srcs = {}, {}
    local n = 0
    for _, c in ipairs(calls) do
        if c[1] == "seqTable" then
            n = n + 1
            local t = c[4]
            sizes[t.pktSize] = (sizes[t.pktSize] or 0) + 1
            srcs[t.ip_src_addr .. ":" .. t.sport] = true
            check(t.ip_dst_addr == vip and tostring(t.dport) == vport and t.ipProto == "tcp",
                "slot " .. c[2] .. " goes to " .. vip .. ":" .. vport .. " over TCP")
        end
    end
    local distinct = 0
    for _ in pairs(srcs) do distinct = distinct + 1 end
    check(n == 12, "12 sequence slots")
    check(sizes[64] == 7 and sizes[594] == 4 and sizes[1518] == 1, "sizes 64:594:1518 = 7:4:1")
    check(distinct == 12, "each slot its own client flow")
    local i_cnt = find("set", "0", "seq_cnt", 12)
    check(i_cnt ~= nil and i_cnt < i_start, "sequence count 12 set before start")
    check(find("set_range", "0", "off") ~= nil, "range mode off")
end

if failures > 0 then
    print(failures .. " check(s) failed for " .. script)
    os.exit(1)
end
print("all checks passed for " .. script)
