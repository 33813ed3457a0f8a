//! Configuration files: any text is accepted or refused with an error, never
//! a panic; and a configuration that is accepted can be started: its
//! services and backends make a registry and a data-plane snapshot, its
//! control keys a server configuration, and its static affinities install
//! into a control plane or are refused with an error.

#![no_main]

use libfuzzer_sys::fuzz_target;

use pktdist::config::Config;
use pktdist::control::server::ServerConfig;
use pktdist::run::memory::TableMemory;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::parse(text, "fuzz.toml") else {
        return;
    };
    let _ = cfg.plan();
    let _ = TableMemory::of(&cfg).to_string();
    ServerConfig::from_config(&cfg).expect("an accepted configuration's control keys");
    // The table's memory is the configuration's to size; the fuzzer's
    // capacities reach 2^30, which the bed does not allocate.
    let capacity = cfg.affinity.capacity.min(1 << 12);
    let _ = pktdist_fuzz::plane(&cfg, capacity);
});
