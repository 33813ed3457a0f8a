//! Build script: with the `dpdk` feature, generates Rust bindings for the
//! part of DPDK that pktdist uses, compiles the C shim for DPDK's
//! `static inline` functions, and links against the system's libdpdk.
//! Without the feature it does nothing, so the crate builds without DPDK.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Oldest DPDK release whose API the bindings and shim are written for.
const MIN_DPDK: &str = "22.11";

/// DPDK functions called from Rust (besides the shim's `pktdist_*`).
const FUNCTIONS: &[&str] = &[
    "rte_eal_init",
    "rte_eal_cleanup",
    "rte_eal_alarm_set",
    "rte_strerror",
    "rte_socket_id",
    "rte_get_tsc_hz",
    "rte_thread_register",
    "rte_thread_unregister",
    "rte_pktmbuf_pool_create",
    "rte_mempool_free",
    "rte_mempool_avail_count",
    "rte_mempool_in_use_count",
    "rte_dev_probe",
    "rte_dev_remove",
    "rte_eth_dev_get_port_by_name",
    "rte_eth_dev_info_get",
    "rte_eth_dev_socket_id",
    "rte_eth_dev_configure",
    "rte_eth_dev_adjust_nb_rx_tx_desc",
    "rte_eth_rx_queue_setup",
    "rte_eth_tx_queue_setup",
    "rte_eth_dev_start",
    "rte_eth_dev_stop",
    "rte_eth_dev_close",
    "rte_eth_promiscuous_enable",
    "rte_eth_promiscuous_disable",
    "rte_eth_macaddr_get",
    "rte_eth_link_get_nowait",
    "rte_eth_stats_get",
    "rte_eth_stats_reset",
];

/// Types used from Rust that no allowlisted function mentions.
const TYPES: &[&str] = &["rte_mbuf", "rte_eth_conf"];

/// Packed structs from the flow headers that bindgen cannot express in Rust.
const OPAQUE: &[&str] = &[
    "rte_l2tpv2_combined_msg_hdr",
    "rte_gtp_psc_generic_hdr",
    "rte_arp_ipv4",
    "rte_arp_hdr",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_DPDK").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/dpdk/shim.c");
    println!("cargo:rerun-if-changed=src/dpdk/shim.h");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG");

    // Version check and link flags (`--libs`), emitted by the pkg-config crate.
    if let Err(e) = pkg_config::Config::new()
        .atleast_version(MIN_DPDK)
        .probe("libdpdk")
    {
        panic!(
            "the `dpdk` feature needs libdpdk >= {MIN_DPDK} found by pkg-config \
             (install libdpdk-dev and pkg-config, or build with --no-default-features): {e}"
        );
    }
    let cflags = dpdk_cflags();

    // The shim: DPDK's hot inline functions and macros as real symbols.
    let mut cc = cc::Build::new();
    cc.file("src/dpdk/shim.c").opt_level(2).warnings(false);
    for f in &cflags {
        cc.flag(f);
    }
    cc.compile("pktdist_dpdk_shim");

    let mut b = bindgen::Builder::default()
        .header("src/dpdk/shim.h")
        // Match the crate's rust-version, not the newest Rust bindgen knows.
        .rust_target(bindgen::RustTarget::stable(80, 0).expect("Rust 1.80 is a known target"))
        .clang_args(&cflags)
        .allowlist_function("pktdist_.*")
        // Checked against the crate's own copies (src/dpdk/mempool.rs).
        .allowlist_var("RTE_PKTMBUF_HEADROOM")
        .allowlist_var("RTE_MBUF_DEFAULT_DATAROOM")
        // Named in the error of a worker that finds no lcore id left.
        .allowlist_var("RTE_MAX_LCORE")
        .default_enum_style(bindgen::EnumVariation::ModuleConsts)
        .derive_default(true)
        .derive_debug(false)
        .generate_comments(false)
        .layout_tests(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for f in FUNCTIONS {
        b = b.allowlist_function(f);
    }
    for t in TYPES {
        b = b.allowlist_type(t);
    }
    for t in OPAQUE {
        b = b.opaque_type(t);
    }
    let bindings = b
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on the DPDK headers: {e}"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("dpdk_bindings.rs"))
        .expect("writing dpdk_bindings.rs");
}

/// The whole `pkg-config --cflags libdpdk` output: it carries
/// `-include rte_config.h` and `-march=...`, which both the C compiler and
/// bindgen need, not just the include paths.
fn dpdk_cflags() -> Vec<String> {
    let pc = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
    let out = Command::new(&pc)
        .args(["--cflags", "libdpdk"])
        .output()
        .unwrap_or_else(|e| panic!("running {pc}: {e}"));
    if !out.status.success() {
        panic!(
            "{pc} --cflags libdpdk failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}
