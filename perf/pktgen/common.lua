-- Code the pktgen scripts here share: settings from the environment, pktgen's
-- command line through a command file, port statistics, the timed send, and
-- the range-mode TCP load of syn-flood.lua and established-mix.lua. Each
-- script loads it from its own directory:
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
    if n == nil then error(name .. " must be a number, not '" .. v .. "'") end
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
    local a, b, c, d = ip:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if a == nil then error("not an IPv4 address: '" .. ip .. "'") end
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

-- Runs pktgen command-line commands through a temporary command file; each
-- command's %s is the port.
function M.cli(port, commands)
    local path = os.tmpname()
    os.remove(path)
    path = path .. ".pkt"
    local f = assert(io.open(path, "w"))
    for _, c in ipairs(commands) do f:write(string.format(c, port), "\n") end
    f:close()
    local ok, err = pcall(pktgen.load, path)
    os.remove(path)
    return ok, err
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

-- The range-mode TCP load: fixed destination s.VIP:s.VIP_PORT and MAC,
-- sources s.SRC_IP_MIN..MAX by INC and s.SRC_PORT_MIN..MAX by INC advancing
-- together, s.PKT_SIZE-byte frames, the TCP flags set by flags.commands
-- (pktgen command lines, see M.cli). If pktgen refuses them it warns, naming
-- flags.name and what the load is without them (flags.fallback), and sends
-- anyway.
function M.tcp_range(name, s, flags)
    if type(pktgen) ~= "table" or type(pktgen.range) ~= "table" then
        error("needs pktgen-dpdk's Lua API with pktgen.range.* (pktgen 20.x or newer)")
    end
    local PORT = s.PORT

    local ips = M.steps(M.ip_to_int(s.SRC_IP_MIN), M.ip_to_int(s.SRC_IP_MAX), M.ip_to_int(s.SRC_IP_INC))
    local sports = M.steps(s.SRC_PORT_MIN, s.SRC_PORT_MAX, s.SRC_PORT_INC)
    -- Address and port advance together, so the pair repeats after lcm(ips, sports).
    local flows = ips // M.gcd(ips, sports) * sports

    M.printf("%s: port %s -> %s:%d (dst mac %s), sources %s-%s x ports %d-%d (%d distinct), %d bytes, rate %d%%, %d s",
        name, PORT, s.VIP, s.VIP_PORT, s.DST_MAC, s.SRC_IP_MIN, s.SRC_IP_MAX, s.SRC_PORT_MIN,
        s.SRC_PORT_MAX, flows, s.PKT_SIZE, s.RATE, s.DURATION)

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

    local ok, err = M.cli(PORT, flags.commands)
    if not ok then
        print(name .. ": WARNING: could not set the TCP flags to " .. flags.name .. " (" .. tostring(err) .. ");")
        print(name .. ": packets carry pktgen's default flags (ACK), " .. flags.fallback)
        print(name .. ": adapt TCP_FLAG_COMMANDS to this pktgen's `help range`.")
    end

    pktgen.set_range(PORT, "on")
    M.send(name, s)
    pktgen.set_range(PORT, "off")

    if s.QUIT then pktgen.quit() end
end

return M
