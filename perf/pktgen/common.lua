-- Code the pktgen scripts here share: settings from the environment,
-- pktgen's version and command grammar, pktgen's command line through a
-- command file, checking what pktgen was actually told (from the
-- configuration it saves), the timed send, port statistics, and the
-- range-mode TCP load of syn-flood.lua and established-mix.lua. Each script
-- loads it from its own directory:
--   dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "") .. "common.lua")
-- and it returns a table of functions.

local M = {}

-- Settings every script has; a script adds or overrides its own in
-- M.settings. Edit the defaults here, or export PKTGEN_<NAME>.
M.DEFAULTS = {
    PORT     = "0",                 -- pktgen port number
    VIP      = "192.0.2.10",        -- service VIP
    VIP_PORT = 80,                  -- service port
    DST_MAC  = "02:00:00:00:00:01", -- pktdist port (or next hop) MAC
    SRC_MAC  = "",                  -- "" = the pktgen port's own MAC
    RATE     = 100,                 -- percent of line rate
    DURATION = 30,                  -- seconds of traffic
    QUIT     = false,               -- PKTGEN_QUIT=1: quit pktgen when done
    RESULT   = "",                  -- file to write "ok" or "error: ..." to at the end
}

function M.printf(fmt, ...)
    print(string.format(fmt, ...))
end

function M.env(name, default)
    local v = os.getenv(name)
    if v == nil or v == "" then return default end
    return v
end

function M.envnum(name, default)
    local v = M.env(name, nil)
    if v == nil then return default end
    local n = tonumber(v)
    if n == nil then error(name .. " must be a number, not '" .. v .. "'", 0) end
    return n
end

-- The settings: M.DEFAULTS overridden by own, each NAME overridden in turn
-- by the environment variable PKTGEN_NAME. A number default takes a number,
-- a boolean one is true when the variable is "1", a string one any text.
function M.settings(own)
    local defaults = {}
    for k, v in pairs(M.DEFAULTS) do defaults[k] = v end
    for k, v in pairs(own or {}) do defaults[k] = v end
    local names = {}
    for k in pairs(defaults) do names[#names + 1] = k end
    table.sort(names)
    local s = {}
    for _, k in ipairs(names) do
        local v, var = defaults[k], "PKTGEN_" .. k
        if type(v) == "number" then
            s[k] = M.envnum(var, v)
        elseif type(v) == "boolean" then
            s[k] = M.env(var, v and "1" or "0") == "1"
        else
            s[k] = M.env(var, v)
        end
    end
    return s
end

function M.ip_to_int(ip)
    local a, b, c, d = tostring(ip):match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if a == nil then error("not an IPv4 address: '" .. tostring(ip) .. "'", 0) end
    return ((tonumber(a) * 256 + tonumber(b)) * 256 + tonumber(c)) * 256 + tonumber(d)
end

function M.int_to_ip(n)
    return string.format("%d.%d.%d.%d", (n >> 24) & 255, (n >> 16) & 255, (n >> 8) & 255, n & 255)
end

function M.gcd(a, b)
    while b ~= 0 do a, b = b, a % b end
    return a
end

-- Number of values a pktgen range walks through from min to max by inc.
function M.steps(min, max, inc)
    if inc == 0 or max <= min then return 1 end
    return math.floor((max - min) / inc) + 1
end

-- pktgen's version as {major, minor, patch} and as text, from
-- pktgen.info.Pktgen_Version ("Pktgen 24.07.1").
function M.version()
    local info = type(pktgen.info) == "table" and pktgen.info.Pktgen_Version or nil
    local a, b, c = tostring(info):match("(%d+)%.(%d+)%.(%d+)")
    if a == nil then
        error("cannot tell pktgen's version (pktgen.info.Pktgen_Version is " .. tostring(info) .. ")", 0)
    end
    return { tonumber(a), tonumber(b), tonumber(c) }, a .. "." .. b .. "." .. c
end

-- Whether version v (as from M.version) is older than {major, minor, patch}.
function M.older(v, than)
    for i = 1, 3 do
        if v[i] ~= than[i] then return v[i] < than[i] end
    end
    return false
end

-- The pktgen command lines that set the range packet's TCP flags to
-- exactly `flags` (a list such as {"syn"} or {"ack", "psh"}) on port %s,
-- in the grammar of pktgen version v:
--   up to 24.07: range <port> tcp flag clr all / range <port> tcp flag set <flag>
--   24.10.3 on:  range <port> tcp flags <flag>,<flag>
-- 24.10.0 to 24.10.2 have no working command for it: their `range ... tcp
-- flag set` matches no handler and `tcp flag clr <x>` clears every flag
-- (fixed upstream in 24.10.3, commit 3822012).
function M.tcp_flag_commands(v, text, flags)
    if M.older(v, { 24, 10, 0 }) then
        local c = { "range %s tcp flag clr all" }
        for _, f in ipairs(flags) do c[#c + 1] = "range %s tcp flag set " .. f end
        return c
    end
    if M.older(v, { 24, 10, 3 }) then
        error("pktgen " .. text .. " cannot set TCP flags in range mode (fixed in 24.10.3);"
            .. " use 24.07.1 (builds against DPDK 22.11) or 24.10.3 and later", 0)
    end
    return { "range %s tcp flags " .. table.concat(flags, ",") }
end

-- Runs pktgen command-line commands through a temporary command file; each
-- command's %s is the port. pktgen reports a command it refuses on its
-- screen only: check the effect with M.saved.
function M.cli(port, commands)
    local path = os.tmpname()
    os.remove(path)
    path = path .. ".pkt"
    local f = assert(io.open(path, "w"))
    for _, c in ipairs(commands) do f:write(string.format(c, port), "\n") end
    f:close()
    local ok, err = pcall(pktgen.load, path)
    os.remove(path)
    if not ok then error("pktgen.load of commands failed: " .. tostring(err), 0) end
end

-- The configuration pktgen holds now, as the command lines pktgen.save
-- writes (in its own version's grammar): a set of lines, and the lines in
-- order.
function M.saved()
    local path = os.tmpname()
    os.remove(path)
    path = path .. ".pkt"
    local ok, err = pcall(pktgen.save, path)
    if not ok then error("pktgen.save failed: " .. tostring(err), 0) end
    local f = io.open(path)
    if f == nil then error("pktgen.save wrote no " .. path, 0) end
    local lines, ordered = {}, {}
    for l in f:lines() do
        lines[l] = true
        ordered[#ordered + 1] = l
    end
    f:close()
    os.remove(path)
    return lines, ordered
end

-- The range packet's TCP flags in a saved configuration, sorted and joined
-- with "," ("" for none), from either grammar.
function M.saved_range_flags(lines, port)
    local set = {}
    for l in pairs(lines) do
        local f = l:match("^range " .. port .. " tcp flag set (%a+)$")
        if f then set[#set + 1] = f end
        local list = l:match("^range " .. port .. " tcp flags ([%a,]+)$")
        if list and list ~= "clr" then
            for x in list:gmatch("%a+") do set[#set + 1] = x end
        end
    end
    table.sort(set)
    return table.concat(set, ",")
end

-- Fails, naming them, unless every line of `want` is in the saved
-- configuration `lines`.
function M.expect_lines(lines, want, what)
    local missing = {}
    for _, l in ipairs(want) do
        if not lines[l] then missing[#missing + 1] = l end
    end
    if #missing > 0 then
        error("pktgen did not take " .. what .. "; its configuration lacks:\n  "
            .. table.concat(missing, "\n  "), 0)
    end
end

-- pktgen.portStats: (portlist, "port") up to 23.x, (portlist) later.
function M.port_stats(port)
    local ok, st = pcall(pktgen.portStats, port, "port")
    if not ok or type(st) ~= "table" then ok, st = pcall(pktgen.portStats, port) end
    if ok and type(st) == "table" then return st end
    return nil, st
end

-- Transmitted packets of a port, from either shape of the statistics.
function M.tx_packets(port)
    local st = M.port_stats(port)
    if st == nil then return nil end
    local p = st[tonumber(port)]
    if type(p) ~= "table" then return nil end
    return p.opackets or (type(p.curr) == "table" and p.curr.opackets) or nil
end

function M.dump(t, indent)
    local keys = {}
    for k in pairs(t) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    for _, k in ipairs(keys) do
        local v = t[k]
        if type(v) == "table" then
            print(indent .. tostring(k) .. ":")
            M.dump(v, indent .. "  ")
        else
            print(indent .. tostring(k) .. " = " .. tostring(v))
        end
    end
end

function M.print_port_stats(port)
    local st, err = M.port_stats(port)
    if st ~= nil then
        print("pktgen port " .. port .. " statistics:")
        M.dump(st, "  ")
    else
        print("pktgen.portStats failed: " .. tostring(err))
    end
end

-- Sends for s.DURATION seconds from a cleared start, printing the packets
-- sent every 5 seconds (prefixed with name), then stops and prints the
-- port's statistics.
function M.send(name, s)
    pktgen.clr()
    pktgen.start(s.PORT)

    local last, last_s = 0, 0
    for t = 1, s.DURATION do
        pktgen.delay(1000)
        if t % 5 == 0 or t == s.DURATION then
            local tx = M.tx_packets(s.PORT)
            if tx ~= nil then
                M.printf("%s: %3d s  sent %d packets  (%.2f Mpps over the last %d s)",
                    name, t, tx, (tx - last) / 1e6 / (t - last_s), t - last_s)
                last, last_s = tx, t
            end
        end
    end

    pktgen.stop(s.PORT)
    pktgen.delay(500)
    M.print_port_stats(s.PORT)
end

-- Runs main(settings) as script `name`: an error is printed as
-- "<name>: ERROR: ..." rather than left on pktgen's screen, written to
-- s.RESULT (with "ok" on success) for a caller such as run-memif.sh, and
-- pktgen quits when s.QUIT whether or not main succeeded.
function M.main(name, s, main)
    local ok, err = pcall(main, s)
    if not ok then
        print(name .. ": ERROR: " .. tostring(err))
        pcall(pktgen.stop, s.PORT)
    end
    if s.RESULT ~= "" then
        local f = io.open(s.RESULT, "w")
        if f then
            f:write(ok and "ok\n" or ("error: " .. tostring(err) .. "\n"))
            f:close()
        end
    end
    if s.QUIT then pktgen.quit() end
    if not ok then error(name .. ": " .. tostring(err), 0) end
end

-- The range-mode TCP load: fixed destination s.VIP:s.VIP_PORT and MAC,
-- sources s.SRC_IP_MIN..MAX by INC and s.SRC_PORT_MIN..MAX by INC advancing
-- together, s.PKT_SIZE-byte frames, exactly the TCP flags in `flags` (a
-- list such as {"syn"}). Fails unless pktgen's saved configuration shows
-- all of it.
function M.tcp_range(name, s, flags)
    if type(pktgen) ~= "table" or type(pktgen.range) ~= "table" then
        error("needs pktgen-dpdk's Lua API with pktgen.range.* (pktgen 20.x or newer)", 0)
    end
    local v, vtext = M.version()
    local flag_commands = M.tcp_flag_commands(v, vtext, flags)
    local PORT = s.PORT

    local ips = M.steps(M.ip_to_int(s.SRC_IP_MIN), M.ip_to_int(s.SRC_IP_MAX), M.ip_to_int(s.SRC_IP_INC))
    local sports = M.steps(s.SRC_PORT_MIN, s.SRC_PORT_MAX, s.SRC_PORT_INC)
    -- Address and port advance together, so the pair repeats after lcm(ips, sports).
    local pairs_walked = ips // M.gcd(ips, sports) * sports

    M.printf("%s: pktgen %s, port %s -> %s:%d (dst mac %s), TCP %s, %d-byte frames, rate %d%%, %d s",
        name, vtext, PORT, s.VIP, s.VIP_PORT, s.DST_MAC, string.upper(table.concat(flags, "+")),
        s.PKT_SIZE, s.RATE, s.DURATION)
    M.printf("%s: sources %s-%s x ports %d-%d: the range walks %d (address, port) pairs, but pktgen"
        .. " builds each TX mbuf once, so the flows sent are the mbufs in circulation: about one TX"
        .. " burst (32) on virtual devices that copy (memif, pcap), more on a NIC, at most its TX pool"
        .. " (16384 mbufs); replay a pcap (syn-flood-pcap.lua) for more",
        name, s.SRC_IP_MIN, s.SRC_IP_MAX, s.SRC_PORT_MIN, s.SRC_PORT_MAX, pairs_walked)

    if s.QUIT then pktgen.screen("off") end
    pktgen.stop(PORT)
    pktgen.set(PORT, "count", 0)
    pktgen.set(PORT, "size", s.PKT_SIZE)
    pktgen.set(PORT, "rate", s.RATE)
    pktgen.set_proto(PORT, "tcp")

    -- pktgen.range.<field>(port, start/min/max/inc): one value for each.
    local function range(field, start, max, inc)
        local f = pktgen.range[field]
        f(PORT, "start", start)
        f(PORT, "min", start)
        f(PORT, "max", max)
        f(PORT, "inc", inc)
    end
    range("dst_mac", s.DST_MAC, s.DST_MAC, "00:00:00:00:00:00")
    if s.SRC_MAC ~= "" then
        range("src_mac", s.SRC_MAC, s.SRC_MAC, "00:00:00:00:00:00")
    end
    range("dst_ip", s.VIP, s.VIP, "0.0.0.0")
    range("src_ip", s.SRC_IP_MIN, s.SRC_IP_MAX, s.SRC_IP_INC)
    pktgen.range.ip_proto(PORT, "tcp")
    range("dst_port", s.VIP_PORT, s.VIP_PORT, 0)
    range("src_port", s.SRC_PORT_MIN, s.SRC_PORT_MAX, s.SRC_PORT_INC)
    range("pkt_size", s.PKT_SIZE, s.PKT_SIZE, 0)
    M.cli(PORT, flag_commands)
    pktgen.set_range(PORT, "on")

    -- What pktgen took, from the configuration it saves.
    local lines = M.saved()
    local want = {}
    local function want_range(what, start, max, inc)
        want[#want + 1] = string.format("range %s %s start %s", PORT, what, start)
        want[#want + 1] = string.format("range %s %s min %s", PORT, what, start)
        want[#want + 1] = string.format("range %s %s max %s", PORT, what, max)
        want[#want + 1] = string.format("range %s %s inc %s", PORT, what, inc)
    end
    want_range("dst ip", s.VIP, s.VIP, "0.0.0.0")
    want_range("src ip", s.SRC_IP_MIN, s.SRC_IP_MAX, s.SRC_IP_INC)
    want_range("dst port", s.VIP_PORT, s.VIP_PORT, 0)
    want_range("src port", s.SRC_PORT_MIN, s.SRC_PORT_MAX, s.SRC_PORT_INC)
    want[#want + 1] = string.format("range %s dst mac start %s", PORT, s.DST_MAC)
    want[#want + 1] = string.format("range %s size start %d", PORT, s.PKT_SIZE)
    want[#want + 1] = string.format("range %s proto tcp", PORT)
    want[#want + 1] = string.format("enable %s range", PORT)
    M.expect_lines(lines, want, "the range settings")
    local got = M.saved_range_flags(lines, PORT)
    local sorted = {}
    for _, f in ipairs(flags) do sorted[#sorted + 1] = f end
    table.sort(sorted)
    if got ~= table.concat(sorted, ",") then
        error("pktgen " .. vtext .. " did not take the TCP flags: range packets carry ["
            .. got .. "], not [" .. table.concat(sorted, ",") .. "] (commands: "
            .. table.concat(flag_commands, "; ") .. ")", 0)
    end

    M.send(name, s)
    pktgen.set_range(PORT, "off")
end

return M
