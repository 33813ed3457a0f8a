-- Established-flow mix against a pktdist service: TCP ACK+PSH segments over a
-- fixed set of client flows (addresses x ports) to one VIP and port, as the
-- data phase of open connections looks on the wire, for a fixed time; then
-- pktgen's port statistics. pktdist routes a flow it has not seen open by
-- its affinities and then the consistent hash (SPEC section 2), so this load
-- needs no handshake first.
--
-- For pktgen-dpdk built with Lua (meson -Denable_lua=true), 22.x/23.x API:
--   pktgen <EAL args> -- -P -m "[1:2].0" -f perf/pktgen/established-mix.lua
-- or at the Pktgen prompt:  load perf/pktgen/established-mix.lua
--
-- Settings: edit the defaults below, or export the PKTGEN_* variable named
-- beside each one before starting pktgen (run-memif.sh does that).

local function printf(fmt, ...)
    print(string.format(fmt, ...))
end

local function env(name, default)
    local v = os.getenv(name)
    if v == nil or v == "" then return default end
    return v
end

local function envnum(name, default)
    local v = env(name, nil)
    if v == nil then return default end
    local n = tonumber(v)
    if n == nil then error(name .. " must be a number, not '" .. v .. "'") end
    return n
end

-- ---------------------------------------------------------------- settings
local PORT         = env("PKTGEN_PORT", "0")               -- pktgen port number
local VIP          = env("PKTGEN_VIP", "192.0.2.10")       -- service VIP
local VIP_PORT     = envnum("PKTGEN_VIP_PORT", 80)         -- service port
local DST_MAC      = env("PKTGEN_DST_MAC", "02:00:00:00:00:01") -- pktdist port (or next hop) MAC
local SRC_MAC      = env("PKTGEN_SRC_MAC", "")             -- "" = the pktgen port's own MAC
local SRC_IP_MIN   = env("PKTGEN_SRC_IP_MIN", "10.99.0.1")      -- client addresses...
local SRC_IP_MAX   = env("PKTGEN_SRC_IP_MAX", "10.99.3.232")    -- ...up to (1000 clients)
local SRC_IP_INC   = env("PKTGEN_SRC_IP_INC", "0.0.0.1")        -- step per packet
local SRC_PORT_MIN = envnum("PKTGEN_SRC_PORT_MIN", 40000)  -- client ports...
local SRC_PORT_MAX = envnum("PKTGEN_SRC_PORT_MAX", 40063)  -- ...up to (64 per client)
local SRC_PORT_INC = envnum("PKTGEN_SRC_PORT_INC", 1)      -- step per packet
local PKT_SIZE     = envnum("PKTGEN_PKT_SIZE", 256)        -- frame size with FCS
local RATE         = envnum("PKTGEN_RATE", 100)            -- percent of line rate
local DURATION     = envnum("PKTGEN_DURATION", 30)         -- seconds of traffic
local QUIT         = env("PKTGEN_QUIT", "0") == "1"        -- quit pktgen when done
-- pktgen CLI commands for the TCP flags: pktgen's Lua range API has no TCP
-- flag setter, its command line does (22.x/23.x syntax; check `help range`
-- in yours). %s is the port.
local TCP_FLAG_COMMANDS = {
    "range %s tcp flag clr all",
    "range %s tcp flag set ack",
    "range %s tcp flag set psh",
}
-- -------------------------------------------------------------------------

local function ip_to_int(ip)
    local a, b, c, d = ip:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if a == nil then error("not an IPv4 address: '" .. ip .. "'") end
    return ((tonumber(a) * 256 + tonumber(b)) * 256 + tonumber(c)) * 256 + tonumber(d)
end

local function gcd(a, b)
    while b ~= 0 do a, b = b, a % b end
    return a
end

-- Number of values a pktgen range walks through from min to max by inc.
local function steps(min, max, inc)
    if inc == 0 or max <= min then return 1 end
    return math.floor((max - min) / inc) + 1
end

-- Runs pktgen command-line commands through a temporary command file.
local function cli(commands)
    local path = os.tmpname()
    os.remove(path)
    path = path .. ".pkt"
    local f = assert(io.open(path, "w"))
    for _, c in ipairs(commands) do f:write(string.format(c, PORT), "\n") end
    f:close()
    local ok, err = pcall(pktgen.load, path)
    os.remove(path)
    return ok, err
end

-- pktgen.portStats: (portlist, "port") up to 23.x, (portlist) later.
local function port_stats(port)
    local ok, st = pcall(pktgen.portStats, port, "port")
    if not ok or type(st) ~= "table" then ok, st = pcall(pktgen.portStats, port) end
    if ok and type(st) == "table" then return st end
    return nil, st
end

-- Transmitted packets of a port, from either shape of the statistics.
local function tx_packets(port)
    local st = port_stats(port)
    if st == nil then return nil end
    local p = st[tonumber(port)]
    if type(p) ~= "table" then return nil end
    return p.opackets or (type(p.curr) == "table" and p.curr.opackets) or nil
end

local function dump(t, indent)
    local keys = {}
    for k in pairs(t) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    for _, k in ipairs(keys) do
        local v = t[k]
        if type(v) == "table" then
            print(indent .. tostring(k) .. ":")
            dump(v, indent .. "  ")
        else
            print(indent .. tostring(k) .. " = " .. tostring(v))
        end
    end
end

local function print_port_stats(port)
    local st, err = port_stats(port)
    if st ~= nil then
        print("pktgen port " .. port .. " statistics:")
        dump(st, "  ")
    else
        print("pktgen.portStats failed: " .. tostring(err))
    end
end

if type(pktgen) ~= "table" or type(pktgen.range) ~= "table" then
    error("needs pktgen-dpdk's Lua API with pktgen.range.* (pktgen 20.x or newer)")
end

local ips = steps(ip_to_int(SRC_IP_MIN), ip_to_int(SRC_IP_MAX), ip_to_int(SRC_IP_INC))
local sports = steps(SRC_PORT_MIN, SRC_PORT_MAX, SRC_PORT_INC)
-- Address and port advance together, so the pair repeats after lcm(ips, sports).
local flows = ips // gcd(ips, sports) * sports

printf("established-mix: port %s -> %s:%d (dst mac %s), sources %s-%s x ports %d-%d (%d distinct), %d bytes, rate %d%%, %d s",
    PORT, VIP, VIP_PORT, DST_MAC, SRC_IP_MIN, SRC_IP_MAX, SRC_PORT_MIN, SRC_PORT_MAX,
    flows, PKT_SIZE, RATE, DURATION)

if QUIT then pktgen.screen("off") end
pktgen.stop(PORT)
pktgen.set(PORT, "count", 0)
pktgen.set(PORT, "size", PKT_SIZE)
pktgen.set(PORT, "rate", RATE)
pktgen.set_proto(PORT, "tcp")

pktgen.range.dst_mac(PORT, "start", DST_MAC)
pktgen.range.dst_mac(PORT, "min", DST_MAC)
pktgen.range.dst_mac(PORT, "max", DST_MAC)
pktgen.range.dst_mac(PORT, "inc", "00:00:00:00:00:00")
if SRC_MAC ~= "" then
    pktgen.range.src_mac(PORT, "start", SRC_MAC)
    pktgen.range.src_mac(PORT, "min", SRC_MAC)
    pktgen.range.src_mac(PORT, "max", SRC_MAC)
    pktgen.range.src_mac(PORT, "inc", "00:00:00:00:00:00")
end

pktgen.range.dst_ip(PORT, "start", VIP)
pktgen.range.dst_ip(PORT, "min", VIP)
pktgen.range.dst_ip(PORT, "max", VIP)
pktgen.range.dst_ip(PORT, "inc", "0.0.0.0")

pktgen.range.src_ip(PORT, "start", SRC_IP_MIN)
pktgen.range.src_ip(PORT, "min", SRC_IP_MIN)
pktgen.range.src_ip(PORT, "max", SRC_IP_MAX)
pktgen.range.src_ip(PORT, "inc", SRC_IP_INC)

pktgen.range.ip_proto(PORT, "tcp")

pktgen.range.dst_port(PORT, "start", VIP_PORT)
pktgen.range.dst_port(PORT, "min", VIP_PORT)
pktgen.range.dst_port(PORT, "max", VIP_PORT)
pktgen.range.dst_port(PORT, "inc", 0)

pktgen.range.src_port(PORT, "start", SRC_PORT_MIN)
pktgen.range.src_port(PORT, "min", SRC_PORT_MIN)
pktgen.range.src_port(PORT, "max", SRC_PORT_MAX)
pktgen.range.src_port(PORT, "inc", SRC_PORT_INC)

pktgen.range.pkt_size(PORT, "start", PKT_SIZE)
pktgen.range.pkt_size(PORT, "min", PKT_SIZE)
pktgen.range.pkt_size(PORT, "max", PKT_SIZE)
pktgen.range.pkt_size(PORT, "inc", 0)

local ok, err = cli(TCP_FLAG_COMMANDS)
if not ok then
    print("established-mix: WARNING: could not set the TCP flags to ACK+PSH (" .. tostring(err) .. ");")
    print("established-mix: packets carry pktgen's default flags (ACK), still an established-flow load.")
    print("established-mix: adapt TCP_FLAG_COMMANDS to this pktgen's `help range`.")
end

pktgen.set_range(PORT, "on")
pktgen.clr()
pktgen.start(PORT)

local last, last_s = 0, 0
for s = 1, DURATION do
    pktgen.delay(1000)
    if s % 5 == 0 or s == DURATION then
        local tx = tx_packets(PORT)
        if tx ~= nil then
            printf("established-mix: %3d s  sent %d packets  (%.2f Mpps over the last %d s)",
                s, tx, (tx - last) / 1e6 / (s - last_s), s - last_s)
            last, last_s = tx, s
        end
    end
end

pktgen.stop(PORT)
pktgen.delay(500)
print_port_stats(PORT)
pktgen.set_range(PORT, "off")

if QUIT then pktgen.quit() end
