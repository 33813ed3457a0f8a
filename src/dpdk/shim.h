/*
 * C shim for pktdist: DPDK's hot-path functions are `static inline` and
 * rte_errno is a macro over a thread-local, so Rust cannot call them
 * directly. Each function here is a thin real symbol around one of them,
 * or around a short sequence of calls over structs Rust need not see.
 * bindgen reads this header (plus the DPDK headers it includes) to
 * generate the Rust bindings.
 */
#ifndef PKTDIST_DPDK_SHIM_H
#define PKTDIST_DPDK_SHIM_H

#include <stdint.h>
#include <rte_eal.h>
#include <rte_alarm.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_cycles.h>
#include <rte_dev.h>
#include <rte_mempool.h>
#include <rte_mbuf.h>
#include <rte_ethdev.h>

uint16_t pktdist_rx_burst(uint16_t port, uint16_t queue,
                          struct rte_mbuf **pkts, uint16_t n);
uint16_t pktdist_tx_burst(uint16_t port, uint16_t queue,
                          struct rte_mbuf **pkts, uint16_t n);
struct rte_mbuf *pktdist_pktmbuf_alloc(struct rte_mempool *mp);
int pktdist_pktmbuf_alloc_bulk(struct rte_mempool *mp,
                               struct rte_mbuf **mbufs, unsigned int n);
void pktdist_pktmbuf_free(struct rte_mbuf *m);
int pktdist_errno(void);
unsigned int pktdist_lcore_id(void);
uint64_t pktdist_rdtsc(void);
/* RTE_ETH_RSS_IP | RTE_ETH_RSS_TCP | RTE_ETH_RSS_UDP (macros over RTE_BIT64). */
uint64_t pktdist_rss_hf_ip_tcp_udp(void);
/* Removes the device that rte_dev_probe(devargs) probed, found by the bus
 * and name its devargs give (for when its ethdev cannot be asked for it).
 * 0 or a negative errno. */
int pktdist_dev_remove_probed(const char *devargs);

#endif
