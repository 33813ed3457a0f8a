-- IMIX against a pktdist service: TCP segments of 64, 594 and 1518 bytes in
-- the proportion 7:4:1 (average 361.8 bytes) to one VIP and port, sent as a
-- 12-packet pktgen sequence, each slot its own client flow; for a fixed time,
-- then pktgen's port statistics. Sizes count the FCS, as pktgen's do.
--
-- For pktgen-dpdk built with Lua (meson -Denable_lua=true), 22.x/23.x API:
--   pktgen <EAL args> -- -P -m "[1:2].0" -f perf/pktgen/imix.lua
-- or at the Pktgen prompt:  load perf/pktgen/imix.lua
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
local PORT        = env("PKTGEN_PORT", "0")                -- pktgen port number
local VIP         = env("PKTGEN_VIP", "192.0.2.10")        -- service VIP
local VIP_PORT    = envnum("PKTGEN_VIP_PORT", 80)          -- service port
local DST_MAC     = env("PKTGEN_DST_MAC", "02:00:00:00:00:01") -- pktdist port (or next hop) MAC
local SRC_MAC     = env("PKTGEN_SRC_MAC", "02:00:00:00:00:02") -- the pktgen port's MAC (required here)
local SRC_IP_BASE = env("PKTGEN_SRC_IP_BASE", "10.98.0.1") -- slot i sends from base + i
local SRC_PORT_BASE = envnum("PKTGEN_SRC_PORT_BASE", 50000) -- slot i sends from port base + i
local RATE        = envnum("PKTGEN_RATE", 100)             -- percent of line rate
local DURATION    = envnum("PKTGEN_DURATION", 30)          -- seconds of traffic
local QUIT        = env("PKTGEN_QUIT", "0") == "1"         -- quit pktgen when done
-- The sequence: 7 x 64, 4 x 594, 1 x 1518, interleaved so that large frames
-- do not come in bursts. pktgen holds at most 16 sequence packets.
local SIZES = { 64, 594, 64, 64, 594, 64, 1518, 64, 594, 64, 64, 594 }
-- -------------------------------------------------------------------------

local function ip_to_int(ip)
    local a, b, c, d = ip:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
    if a == nil then error("not an IPv4 address: '" .. ip .. "'") end
    return ((tonumber(a) * 256 + tonumber(b)) * 256 + tonumber(c)) * 256 + tonumber(d)
end

local function int_to_ip(n)
    return string.format("%d.%d.%d.%d", (n >> 24) & 255, (n >> 16) & 255, (n >> 8) & 255, n & 255)
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

if type(pktgen) ~= "table" or type(pktgen.seqTable) ~= "function" then
    error("needs pktgen-dpdk's Lua API with pktgen.seqTable (pktgen 20.x or newer)")
end
if #SIZES > 16 then error("pktgen holds at most 16 sequence packets") end

local counts, bytes = {}, 0
for _, sz in ipairs(SIZES) do
    counts[sz] = (counts[sz] or 0) + 1
    bytes = bytes + sz
end
printf("imix: port %s -> %s:%d (dst mac %s), %d slots: 64 x%d, 594 x%d, 1518 x%d, average %.1f bytes, rate %d%%, %d s",
    PORT, VIP, VIP_PORT, DST_MAC, #SIZES, counts[64] or 0, counts[594] or 0, counts[1518] or 0,
    bytes / #SIZES, RATE, DURATION)

if QUIT then pktgen.screen("off") end
pktgen.stop(PORT)
if type(pktgen.set_range) == "function" then pktgen.set_range(PORT, "off") end
pktgen.set(PORT, "count", 0)
pktgen.set(PORT, "rate", RATE)

local base = ip_to_int(SRC_IP_BASE)
for i, sz in ipairs(SIZES) do
    pktgen.seqTable(i - 1, PORT, {
        eth_dst_addr = DST_MAC,
        eth_src_addr = SRC_MAC,
        ip_dst_addr = VIP,
        ip_src_addr = int_to_ip(base + i - 1) .. "/24",
        sport = SRC_PORT_BASE + i - 1,
        dport = VIP_PORT,
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

pktgen.clr()
pktgen.start(PORT)

local last, last_s = 0, 0
for s = 1, DURATION do
    pktgen.delay(1000)
    if s % 5 == 0 or s == DURATION then
        local tx = tx_packets(PORT)
        if tx ~= nil then
            printf("imix: %3d s  sent %d packets  (%.2f Mpps over the last %d s)",
                s, tx, (tx - last) / 1e6 / (s - last_s), s - last_s)
            last, last_s = tx, s
        end
    end
end

pktgen.stop(PORT)
pktgen.delay(500)
print_port_stats(PORT)
pktgen.set(PORT, "seq_cnt", 0)

if QUIT then pktgen.quit() end
