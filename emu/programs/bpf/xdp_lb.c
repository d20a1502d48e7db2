/* A small layer-4 load balancer in the style of the kernel's samples/bpf xdp_tx_iptunnel and Katran: an
 * IPv4 packet to the virtual IP vip_addr (.rodata) and vip_port (UDP or TCP) is encapsulated IPv4-in-IPv4
 * (bpf_xdp_adjust_head grows the frame by an outer IP header) towards one of num_backends backends (the
 * array map backends: address and MAC), chosen by a hash of the flow (source address and ports), with the
 * outer header's checksum from bpf_csum_diff, and bounced out with XDP_TX. Per-backend packet counts are in
 * the per-CPU array lb_stats; everything else is XDP_PASS. */
#include "xdp_common.h"
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>

#define MAX_BACKENDS 16

struct backend {
	__be32 addr;
	unsigned char mac[ETH_ALEN];
	__u16 pad;
};

const volatile __be32 vip_addr = 0;  /* network order, as in the packet */
const volatile __u16 vip_port = 0;   /* host order */
const volatile __be32 lb_addr = 0;   /* the outer header's source */
const volatile __u32 num_backends = 1;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct backend);
	__uint(max_entries, MAX_BACKENDS);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, MAX_BACKENDS);
} lb_stats SEC(".maps");

static __always_inline __u16 csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return ~csum;
}

SEC("xdp")
int xdp_lb(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;
	unsigned char *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = (void *)data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *l4;  /* the ports are where UDP and TCP both have them */
	struct backend *be;
	unsigned char our_mac[ETH_ALEN];
	__u32 key, n = num_backends;
	__u16 inner_len;

	if ((void *)(ip + 1) > (void *)end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5)
		return XDP_PASS;
	if (ip->daddr != vip_addr || (ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_TCP))
		return XDP_PASS;
	l4 = (void *)(ip + 1);
	if ((void *)(l4 + 1) > (void *)end || l4->dest != bpf_htons(vip_port))
		return XDP_PASS;
	if (n == 0 || n > MAX_BACKENDS)
		return XDP_ABORTED;
	key = (bpf_ntohl(ip->saddr) * 2654435761u ^ ((__u32)l4->source << 16 | bpf_ntohs(l4->dest))) % n;
	be = bpf_map_lookup_elem(&backends, &key);
	if (!be || !be->addr)
		return XDP_DROP;
	inner_len = bpf_ntohs(ip->tot_len);
	__builtin_memcpy(our_mac, eth->h_dest, ETH_ALEN);

	if (bpf_xdp_adjust_head(ctx, -(int)sizeof(struct iphdr)))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = (void *)data;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > (void *)end)
		return XDP_DROP;

	__builtin_memcpy(eth->h_dest, be->mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, our_mac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);

	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(inner_len + sizeof(struct iphdr));
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = 64;
	ip->protocol = IPPROTO_IPIP;
	ip->check = 0;
	ip->saddr = lb_addr;
	ip->daddr = be->addr;
	ip->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));

	count(&lb_stats, key, 1);
	return XDP_TX;
}

char _license[] SEC("license") = "GPL";
