/* Swap the MACs and bounce the frame out of the port it came in on (XDP_TX): samples/bpf xdp2 and
 * xdp-bench tx, the twin of emu.programs:xdp_tx. A frame too short for the MACs is dropped. */
#include "xdp_common.h"

SEC("xdp")
int xdp_tx(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;
	unsigned char *data_end = (void *)(long)ctx->data_end;

	if (data + 2 * ETH_ALEN > data_end)
		return XDP_DROP;
	swap_macs(data);
	return XDP_TX;
}

char _license[] SEC("license") = "GPL";
