/* XDP_DROP everything, counting packets (rxcnt[0]) and bytes (rxcnt[1]) per CPU: samples/bpf xdp1, the twin
 * of emu.programs:xdp_drop. */
#include "xdp_common.h"

RXCNT_MAP(2);

SEC("xdp")
int xdp_drop(struct xdp_md *ctx)
{
	count(&rxcnt, 0, 1);
	count(&rxcnt, 1, ctx->data_end - ctx->data);
	return XDP_DROP;
}

char _license[] SEC("license") = "GPL";
