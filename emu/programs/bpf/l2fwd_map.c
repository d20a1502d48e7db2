/* Swap the MACs and bpf_redirect_map() through slot 0 of the devmap tx_port (an empty slot aborts, flags 0):
 * samples/bpf xdp_redirect_map, the twin of emu.programs:l2fwd_map. rxcnt[0] counts packets per CPU. */
#include "xdp_common.h"

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 64);
} tx_port SEC(".maps");

RXCNT_MAP(1);

SEC("xdp")
int l2fwd_map(struct xdp_md *ctx)
{
	unsigned char *data = (void *)(long)ctx->data;
	unsigned char *data_end = (void *)(long)ctx->data_end;

	if (data + 2 * ETH_ALEN > data_end)
		return XDP_DROP;
	swap_macs(data);
	count(&rxcnt, 0, 1);
	return bpf_redirect_map(&tx_port, 0, 0);
}

char _license[] SEC("license") = "GPL";
