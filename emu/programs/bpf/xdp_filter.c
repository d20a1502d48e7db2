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

/* Both bounds a header must fit in: the frame (end, which the verifier checks) and the IP datagram's own
 * length (lim, bytes from the frame's start: IPv4 tot_len, IPv6 payload_len; 0 when the field is 0, as a
 * TSO packet's), as a packet library reads them. */
static __always_inline long off_of(unsigned char *data, unsigned char *p)
{
	long off = p - data;

	/* an opaque scalar from here: clang 14 would otherwise fold (p - data) + n into n - data + p, pointer
	 * arithmetic the verifier refuses ("tried to subtract pointer from scalar") */
	asm volatile("" : "+r"(off));
	return off;
}

static __always_inline int fits(unsigned char *data, unsigned char *p, unsigned char *end, long lim, int n)
{
	return p + n <= end && (!lim || off_of(data, p) + n <= lim);
}

/* The L4 protocol and its header, or 0 when there is none to filter. */
static __always_inline int l4_of_ipv4(unsigned char *data, unsigned char *p, unsigned char *end,
				      unsigned char **l4, long *lim)
{
	struct iphdr *ip = (void *)p;

	if ((void *)(ip + 1) > (void *)end || ip->ihl < 5)
		return 0;
	if (ip->frag_off & bpf_htons(0x1fff)) /* not the first fragment: no L4 header here */
		return 0;
	*lim = ip->tot_len ? off_of(data, p) + bpf_ntohs(ip->tot_len) : 0;
	*l4 = p + ip->ihl * 4;
	return ip->protocol;
}

static __always_inline int l4_of_ipv6(unsigned char *data, unsigned char *p, unsigned char *end,
				      unsigned char **l4, long *lim)
{
	struct ipv6hdr *ip6 = (void *)p;
	int nexthdr;

	if ((void *)(ip6 + 1) > (void *)end)
		return 0;
	nexthdr = ip6->nexthdr;
	p = (void *)(ip6 + 1);
	*lim = ip6->payload_len ? off_of(data, p) + bpf_ntohs(ip6->payload_len) : 0;
	for (int i = 0; i < IPV6_EXT_MAX; i++) {
		unsigned char *h = p;

		if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_DSTOPTS && nexthdr != IPPROTO_ROUTING &&
		    nexthdr != IPPROTO_AH && nexthdr != IPPROTO_FRAGMENT && nexthdr != IPPROTO_ESP) {
			*l4 = p;
			return nexthdr;
		}
		if (nexthdr == IPPROTO_ESP) /* encrypted: nothing to read */
			return 0;
		if (!fits(data, h, end, *lim, 8))
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
		default: /* IPPROTO_FRAGMENT */
			if (((h[2] << 8) | h[3]) & 0xfff8) /* fragment offset: not the first fragment */
				return 0;
			p = h + 8;
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
	long lim = 0;

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
		ipproto = l4_of_ipv4(data, p, end, &l4, &lim);
	else if (proto == ETH_P_IPV6)
		ipproto = l4_of_ipv6(data, p, end, &l4, &lim);

	if (ipproto == IPPROTO_UDP && l4 && fits(data, l4, end, lim, sizeof(struct udphdr))) {
		port = bpf_ntohs(((struct udphdr *)l4)->dest);
		if (bpf_map_lookup_elem(&deny_ports, &port))
			goto drop;
	} else if (ipproto == IPPROTO_TCP && l4 && fits(data, l4, end, lim, sizeof(struct tcphdr)) &&
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
