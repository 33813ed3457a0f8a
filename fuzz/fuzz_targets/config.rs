//! Configuration files: any text is accepted or refused with an error, never
//! a panic; and a configuration that is accepted can be started: its
//! services and backends make a registry and a data-plane snapshot, its
//! control keys a server configuration, and its static affinities install
//! into a control plane or are refused with an error.

#![no_main]

use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;

use pktdist::affinity::manager::AffinityManager;
use pktdist::affinity::table::AffinityTable;
use pktdist::config::Config;
use pktdist::control::plane::ControlPlane;
use pktdist::control::registry::ServiceRegistry;
use pktdist::control::server::ServerConfig;
use pktdist::control::statics;
use pktdist::datapath::snapshot::DataplaneCell;
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
    let mut registry =
        ServiceRegistry::from_config(&cfg).expect("an accepted configuration's services");
    let dp = registry
        .snapshot()
        .expect("an accepted configuration's snapshot");
    ServerConfig::from_config(&cfg).expect("an accepted configuration's control keys");
    // The table's memory is the configuration's to size; the fuzzer's
    // capacities reach 2^30, which the bed does not allocate.
    let capacity = cfg.affinity.capacity.min(1 << 12);
    let (writer, _) = AffinityTable::new(capacity);
    let mut plane = ControlPlane::new(
        registry,
        Arc::new(DataplaneCell::new(dp)),
        AffinityManager::new(writer),
        Vec::new(),
        Instant::now(),
    );
    let _ = statics::install(&mut plane, &cfg);
});
