/* Flood every frame to all devices of the devmap tx_ports but the one it came in on:
 * bpf_redirect_map(&tx_ports, 0, BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS), the kernel selftests'
 * xdp_redirect_multi, the twin of emu.programs:xdp_broadcast.  The key is ignored and the verdict is
 * XDP_REDIRECT even when the map is empty (the kernel's __bpf_xdp_redirect_map); the targets are read
 * at xdp_do_redirect (dev_map_enqueue_multi).  exclude_ingress (.rodata, the topology's `globals`, as the
 * Python twin's params.exclude_ingress) set to 0 drops the second flag. */
#include "xdp_common.h"

const volatile __u32 exclude_ingress = 1;

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 64);
} tx_ports SEC(".maps");

SEC("xdp")
int xdp_broadcast(struct xdp_md *ctx)
{
	return bpf_redirect_map(&tx_ports, 0, BPF_F_BROADCAST | (exclude_ingress ? BPF_F_EXCLUDE_INGRESS : 0));
}

char _license[] SEC("license") = "GPL";
