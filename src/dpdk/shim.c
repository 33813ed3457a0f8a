/* See shim.h. */
#include <errno.h>
#include <rte_bus.h>
#include <rte_devargs.h>

#include "shim.h"

uint16_t pktdist_rx_burst(uint16_t port, uint16_t queue,
                          struct rte_mbuf **pkts, uint16_t n)
{
	return rte_eth_rx_burst(port, queue, pkts, n);
}

uint16_t pktdist_tx_burst(uint16_t port, uint16_t queue,
                          struct rte_mbuf **pkts, uint16_t n)
{
	return rte_eth_tx_burst(port, queue, pkts, n);
}

struct rte_mbuf *pktdist_pktmbuf_alloc(struct rte_mempool *mp)
{
	return rte_pktmbuf_alloc(mp);
}

int pktdist_pktmbuf_alloc_bulk(struct rte_mempool *mp,
                               struct rte_mbuf **mbufs, unsigned int n)
{
	return rte_pktmbuf_alloc_bulk(mp, mbufs, n);
}

void pktdist_pktmbuf_free(struct rte_mbuf *m)
{
	rte_pktmbuf_free(m);
}

int pktdist_errno(void)
{
	return rte_errno;
}

unsigned int pktdist_lcore_id(void)
{
	return rte_lcore_id();
}

uint64_t pktdist_rdtsc(void)
{
	return rte_rdtsc();
}

uint64_t pktdist_rss_hf_ip_tcp_udp(void)
{
	return RTE_ETH_RSS_IP | RTE_ETH_RSS_TCP | RTE_ETH_RSS_UDP;
}

int pktdist_dev_remove_probed(const char *devargs)
{
	struct rte_devargs da;
	int ret = rte_devargs_parse(&da, devargs);

	if (ret < 0)
		return ret;
	ret = da.bus == NULL ? -ENODEV : rte_eal_hotplug_remove(rte_bus_name(da.bus), da.name);
	rte_devargs_reset(&da);
	return ret;
}
