/* l2fwd for XDP multi-buffer frames (SEC("xdp.frags"): BPF_F_XDP_HAS_FRAGS, so it may be attached to a
 * device whose MTU needs more than one RX buffer): reads the Ethernet header with bpf_xdp_load_bytes (it
 * works whatever the linear part holds), swaps the MACs and writes them back with bpf_xdp_store_bytes,
 * and bpf_redirect()s to the egress device whose ifindex the loader sets in .rodata (as l2fwd.c).
 * bpf_xdp_get_buff_len gives the whole frame's length: lenclass counts packets and bytes per CPU by length
 * class (0: up to 1518 bytes, 1: up to 4096, 2: up to 9018, 3: longer); the frame's last 4 bytes (in its
 * last fragment when it has some) are folded into tailsum[0], so that the fragments are read too.
 * rxcnt[0] counts forwarded packets per CPU. */
#include "xdp_common.h"

const volatile __u32 egress_ifindex = 0;

RXCNT_MAP(1);

struct lenclass_val {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct lenclass_val);
	__uint(max_entries, 4);
} lenclass SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} tailsum SEC(".maps");

SEC("xdp.frags")
int xdp_l2fwd_frags(struct xdp_md *ctx)
{
	unsigned char eth[2 * ETH_ALEN];
	__u32 len = bpf_xdp_get_buff_len(ctx);
	__u32 key, tail = 0;
	struct lenclass_val *lc;

	if (len < ETH_HLEN || bpf_xdp_load_bytes(ctx, 0, eth, sizeof(eth)))
		return XDP_DROP;
	swap_macs(eth);
	if (bpf_xdp_store_bytes(ctx, 0, eth, sizeof(eth)))
		return XDP_DROP;
	key = len <= 1518 ? 0 : len <= 4096 ? 1 : len <= 9018 ? 2 : 3;
	lc = bpf_map_lookup_elem(&lenclass, &key);
	if (lc) {
		lc->packets++;
		lc->bytes += len;
	}
	if (bpf_xdp_load_bytes(ctx, len - 4, &tail, sizeof(tail)) == 0)
		count(&tailsum, 0, tail);
	count(&rxcnt, 0, 1);
	return bpf_redirect(egress_ifindex, 0);
}

char _license[] SEC("license") = "GPL";
