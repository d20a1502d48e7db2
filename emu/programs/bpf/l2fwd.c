/* Swap the MACs and bpf_redirect() to one egress device, whose ifindex the loader sets in .rodata before
 * load (a libbpf skeleton's rodata, the topology's `globals: {egress_ifindex: ...}`): samples/bpf
 * xdp_redirect, the twin of emu.programs:l2fwd. rxcnt[0] counts forwarded packets per CPU. */
#include "xdp_common.h"

const volatile __u32 egress_ifindex = 0;

RXCNT_MAP(1);

SEC("xdp")
int l2fwd(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;
	unsigned char *data_end = (void *)(long)ctx->data_end;

	if (data + 2 * ETH_ALEN > data_end)
		return XDP_DROP;
	swap_macs(data);
	count(&rxcnt, 0, 1);
	return bpf_redirect(egress_ifindex, 0);
}

char _license[] SEC("license") = "GPL";
