/* An xdp-filter-like firewall (xdp-tools' xdp-filter, its port filter): parse Ethernet, up to two VLAN tags
 * (802.1Q, 802.1ad QinQ), IPv4 or IPv6 (walking its extension headers), and drop TCP or UDP whose
 * destination port is in the hash map deny_ports (rxcnt[1] per CPU); forward everything else like l2fwd
 * (MACs swapped, bpf_redirect to egress_ifindex from .rodata; rxcnt[0]). The twin of
 * emu.programs:l2fwd_filter: a frame too short for Ethernet is dropped, a header that is truncated, a
 * non-first fragment, or ESP leaves nothing to filter, and the frame is forwarded. */
#include "xdp_common.h"
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#define ETH_P_8021AD_ 0x88A8
#define ETH_P_QINQ1 0x9100
#define ETH_P_QINQ2 0x9200
#define IPV6_EXT_MAX 8

const volatile __u32 egress_ifindex = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16); /* destination port, host order */
	__type(value, __u8);
	__uint(max_entries, 1024);
} deny_ports SEC(".maps");

RXCNT_MAP(2);

struct vlan_tag {
	__be16 tci;
	__be16 proto;
};

/* The L4 protocol and its header, or 0 when there is none to filter. */
static __always_inline int l4_of_ipv4(unsigned char *p, unsigned char *end, unsigned char **l4)
{
	struct iphdr *ip = (void *)p;

	if ((void *)(ip + 1) > (void *)end || ip->ihl < 5)
		return 0;
	if (ip->frag_off & bpf_htons(0x1fff)) /* not the first fragment: no L4 header here */
		return 0;
	*l4 = p + ip->ihl * 4;
	return ip->protocol;
}

static __always_inline int l4_of_ipv6(unsigned char *p, unsigned char *end, unsigned char **l4)
{
	struct ipv6hdr *ip6 = (void *)p;
	int nexthdr;

	if ((void *)(ip6 + 1) > (void *)end)
		return 0;
	nexthdr = ip6->nexthdr;
	p = (void *)(ip6 + 1);
	for (int i = 0; i < IPV6_EXT_MAX; i++) {
		unsigned char *h = p;

		if (h + 8 > end)
			return 0;
		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_DSTOPTS:
			p = h + (h[1] + 1) * 8;
			break;
		case IPPROTO_ROUTING:
			p = h + h[1] * 8 + 8;
			break;
		case IPPROTO_AH:
			p = h + (h[1] + 2) * 4;
			break;
		case IPPROTO_FRAGMENT:
			if (((h[2] << 8) | h[3]) & 0xfff8) /* fragment offset: not the first fragment */
				return 0;
			p = h + 8;
			break;
		case IPPROTO_ESP: /* encrypted: nothing to read */
			return 0;
		default:
			*l4 = p;
			return nexthdr;
		}
		nexthdr = h[0];
	}
	return 0;
}

SEC("xdp")
int xdp_filter(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;
	unsigned char *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = (void *)data;
	unsigned char *p, *l4 = 0;
	__u16 proto, port;
	int ipproto = 0;

	if ((void *)(eth + 1) > (void *)end)
		return XDP_DROP;
	proto = bpf_ntohs(eth->h_proto);
	p = (void *)(eth + 1);
	if (proto == ETH_P_8021Q || proto == ETH_P_8021AD_ || proto == ETH_P_QINQ1 || proto == ETH_P_QINQ2) {
		struct vlan_tag *tag = (void *)p;

		if ((void *)(tag + 1) > (void *)end)
			goto forward;
		proto = bpf_ntohs(tag->proto);
		p = (void *)(tag + 1);
		if (proto == ETH_P_8021Q) {
			tag = (void *)p;
			if ((void *)(tag + 1) > (void *)end)
				goto forward;
			proto = bpf_ntohs(tag->proto);
			p = (void *)(tag + 1);
		}
	}
	if (proto == ETH_P_IP)
		ipproto = l4_of_ipv4(p, end, &l4);
	else if (proto == ETH_P_IPV6)
		ipproto = l4_of_ipv6(p, end, &l4);

	if (ipproto == IPPROTO_UDP && l4 && l4 + sizeof(struct udphdr) <= end) {
		port = bpf_ntohs(((struct udphdr *)l4)->dest);
		if (bpf_map_lookup_elem(&deny_ports, &port))
			goto drop;
	} else if (ipproto == IPPROTO_TCP && l4 && l4 + sizeof(struct tcphdr) <= end &&
		   ((struct tcphdr *)l4)->doff >= 5) {
		port = bpf_ntohs(((struct tcphdr *)l4)->dest);
		if (bpf_map_lookup_elem(&deny_ports, &port))
			goto drop;
	}
forward:
	swap_macs(data);
	count(&rxcnt, 0, 1);
	return bpf_redirect(egress_ifindex, 0);
drop:
	count(&rxcnt, 1, 1);
	return XDP_DROP;
}

char _license[] SEC("license") = "GPL";
