/* Tail calls through a prog_array holding programs of this object: the entry jumps to the slot the frame
 * names (an empty slot falls through), each target marks the frame and may jump on once more. */
#include "corpus.h"

#define N 4

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
	__uint(max_entries, 4);
} jmp SEC(".maps");

SEC("xdp")
int tail_a(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);

	if (!io)
		return XDP_DROP;
	io->out[1] += 0xa;
	bpf_tail_call(ctx, &jmp, (io->b >> 8) & 3);
	return XDP_TX;
}

SEC("xdp")
int tail_b(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);

	if (!io)
		return XDP_DROP;
	io->out[2] += 0xb;
	return XDP_PASS;
}

SEC("xdp")
int tail_entry(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);

	if (!io)
		return XDP_DROP;
	io->out[0] = 1;
	bpf_tail_call(ctx, &jmp, io->b & 7);
	io->out[3] = 0xdead; /* the slot was empty or out of range */
	return XDP_DROP;
}
