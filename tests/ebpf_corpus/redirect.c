/* bpf_redirect_map's flags, the frame choosing key (a) and flags (b): a devmap and a devmap_hash, so that
 * the fallback action in the low bits, BPF_F_BROADCAST (the key ignored, XDP_REDIRECT whatever the map
 * holds), BPF_F_EXCLUDE_INGRESS with and without it, and unknown bits (XDP_ABORTED) meet the kernel's
 * __bpf_xdp_redirect_map.  The return value is the result (BPF_PROG_TEST_RUN does not redirect). */
#include "corpus.h"

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 8);
} dm SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 8);
} dh SEC(".maps");

SEC("xdp")
int redir_devmap(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, 0);

	if (!io)
		return XDP_DROP;
	return bpf_redirect_map(&dm, io->a, io->b);
}

SEC("xdp")
int redir_devhash(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, 0);

	if (!io)
		return XDP_DROP;
	return bpf_redirect_map(&dh, io->a, io->b);
}
