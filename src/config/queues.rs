//! How the frames a port receives reach the workers' receive queues. Worker
//! w polls queue w of every port, so several workers share a port's load
//! only when something spreads its flows over the queues, each flow always
//! to the same one: RSS on a NIC, the kernel's packet fan-out for
//! `net_af_packet`, the peer for `net_memif`, the built-in traffic source
//! on the port it feeds. `pktdist check` prints it without opening the
//! devices; `pktdist run` warns where nothing spreads.

use super::PortConfig;

/// How a port's received flows are spread over the workers' queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    /// One worker: one queue, nothing to spread.
    OneQueue,
    /// A NIC: RSS on IP addresses and TCP/UDP ports, asked for at start. A
    /// device without it receives everything on queue 0 (`pktdist run`
    /// says so).
    Rss,
    /// `net_af_packet` with `qpairs` = workers: one socket per queue, joined
    /// in a PACKET_FANOUT group that picks the socket by the kernel's flow
    /// hash.
    KernelFanout,
    /// `net_memif`: the peer picks the queue each frame goes to.
    Peer,
    /// The port the built-in traffic source feeds: it puts each flow on the
    /// queue a NIC's RSS would.
    TrafficSource,
    /// Another virtual device: RSS if its driver has it; otherwise queue w
    /// receives only what is put on it (`net_ring`: what is transmitted on
    /// queue w of the same ring).
    Driver,
}

impl Spread {
    /// What `pktdist check` prints for a port.
    pub fn describe(self) -> &'static str {
        match self {
            Spread::OneQueue => "one queue, no RSS needed",
            Spread::Rss => "RSS requested on IP addresses and TCP/UDP ports; pktdist run logs whether the NIC has it",
            Spread::KernelFanout => "no RSS: the kernel's packet fan-out (PACKET_FANOUT_HASH) spreads flows over the qpairs sockets",
            Spread::Peer => "no RSS: the memif peer picks the queue of each frame",
            Spread::TrafficSource => "no RSS: the traffic source puts each flow on the queue RSS would",
            Spread::Driver => "RSS only if the driver has it; otherwise each queue receives what is put on it",
        }
    }
}

/// The device a device string names, for telling two apart: the part
/// before the first comma, in lower case, without PCI domain 0 (DPDK names
/// `3B:00.0` and `0000:3b:00.0` alike).
pub fn device_name(device: &str) -> String {
    let name = device.split(',').next().unwrap_or_default().trim();
    let name = name.to_ascii_lowercase();
    match name.strip_prefix("0000:") {
        Some(short) => short.to_string(),
        None => name,
    }
}

/// The driver part of a device string: `net_af_packet0,iface=x` gives
/// `net_af_packet` (the instance number dropped); a PCI address gives "".
pub fn vdev_driver(device: &str) -> &str {
    let name = device.split(',').next().unwrap_or_default().trim();
    if !name.starts_with("net_") && !name.starts_with("eth_") {
        return "";
    }
    name.trim_end_matches(|c: char| c.is_ascii_digit())
}

/// The value of `key` among a device string's `key=value` arguments.
pub fn device_arg<'a>(device: &'a str, key: &str) -> Option<&'a str> {
    device.split(',').skip(1).find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim())
    })
}

impl PortConfig {
    /// How this port's flows reach `workers` workers' queues; `fed` when the
    /// built-in traffic source feeds it.
    pub fn spread(&self, workers: usize, fed: bool) -> Spread {
        if workers <= 1 {
            return Spread::OneQueue;
        }
        if fed {
            return Spread::TrafficSource;
        }
        if self.is_pci() {
            return Spread::Rss;
        }
        match vdev_driver(&self.device) {
            "net_af_packet" | "eth_af_packet" => Spread::KernelFanout,
            "net_memif" => Spread::Peer,
            _ => Spread::Driver,
        }
    }

    /// A device whose queue count is fixed in its device string must have
    /// one queue pair per worker: an `net_af_packet` port's `qpairs`, since
    /// the kernel spreads flows over every socket of the group, and a queue
    /// no worker polls would swallow its share.
    pub(super) fn check_queues(&self, workers: usize) -> Result<(), String> {
        if !matches!(vdev_driver(&self.device), "net_af_packet" | "eth_af_packet") {
            return Ok(());
        }
        let qpairs = match device_arg(&self.device, "qpairs") {
            None => 1,
            Some(v) => v.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                format!("qpairs={v}: expected a number of queue pairs, at least 1")
            })?,
        };
        if qpairs != workers {
            return Err(format!(
                "net_af_packet with qpairs={qpairs} for {workers} worker{}: set qpairs={workers} in the device string (the kernel spreads flows over all qpairs sockets, one per worker)",
                if workers == 1 { "" } else { "s" }
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(device: &str) -> PortConfig {
        PortConfig {
            name: "p".into(),
            device: device.into(),
            rx_descriptors: 1024,
            tx_descriptors: 1024,
            gateway_mac: None,
            forward_to: None,
            unmatched_to: None,
            mtu: 1500,
            promiscuous: None,
        }
    }

    #[test]
    fn drivers_and_arguments() {
        assert_eq!(vdev_driver("net_af_packet0,iface=lb0"), "net_af_packet");
        assert_eq!(vdev_driver("net_ring12"), "net_ring");
        assert_eq!(vdev_driver("0000:3b:00.0"), "");
        let d = "net_af_packet0,iface=lb0, qpairs = 2";
        assert_eq!(device_arg(d, "qpairs"), Some("2"));
        assert_eq!(device_arg(d, "iface"), Some("lb0"));
        assert_eq!(device_arg(d, "framecnt"), None);
        assert_eq!(device_arg("net_ring0", "qpairs"), None);
    }

    #[test]
    fn spreads() {
        assert_eq!(port("0000:3b:00.0").spread(1, false), Spread::OneQueue);
        assert_eq!(port("0000:3b:00.0").spread(4, false), Spread::Rss);
        assert_eq!(
            port("net_af_packet0,iface=x,qpairs=2").spread(2, false),
            Spread::KernelFanout
        );
        assert_eq!(port("net_memif0").spread(3, false), Spread::Peer);
        assert_eq!(port("net_ring0").spread(2, true), Spread::TrafficSource);
        assert_eq!(port("net_ring0").spread(2, false), Spread::Driver);
    }

    #[test]
    fn af_packet_has_one_queue_pair_per_worker() {
        assert!(port("net_af_packet0,iface=x").check_queues(1).is_ok());
        assert!(port("net_af_packet0,iface=x,qpairs=3")
            .check_queues(3)
            .is_ok());
        let e = port("net_af_packet0,iface=x").check_queues(2).unwrap_err();
        assert!(
            e.contains("qpairs=1 for 2 workers") && e.contains("set qpairs=2"),
            "{e}"
        );
        let e = port("net_af_packet0,iface=x,qpairs=4")
            .check_queues(2)
            .unwrap_err();
        assert!(e.contains("set qpairs=2"), "{e}");
        let e = port("net_af_packet0,iface=x,qpairs=two")
            .check_queues(2)
            .unwrap_err();
        assert!(e.contains("qpairs=two"), "{e}");
        assert!(port("net_ring0").check_queues(8).is_ok());
    }
}
