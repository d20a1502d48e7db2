/* The stack, bounded loops, bpf-to-bpf calls (a static and a global sub-program in .text, nested), and
 * bpf_loop with a callback: results computed over the frame's bytes. */
#include "corpus.h"

#define N 6

static __noinline __u64 mix(__u64 x, __u64 y)
{
	return (x * 0x9e3779b97f4a7c15ULL) ^ (y >> 7) ^ (y << 3);
}

__noinline __u64 fold(__u64 x)
{
	return mix(x, x >> 32) + mix(x >> 16, 5);
}

struct loop_ctx {
	__u64 acc;
	__u64 seed;
};

static long step(__u32 i, void *p)
{
	struct loop_ctx *lc = p;

	lc->acc = lc->acc * 31 + (lc->seed >> (i & 63)) + i;
	return lc->acc == 0x1234 ? 1 : 0; /* an early stop the operands may trigger */
}

SEC("xdp")
int calls(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);
	unsigned char *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct loop_ctx lc;
	__u64 stack[16];
	__u64 sum = 0;
	int i;

	if (!io)
		return XDP_DROP;
	for (i = 0; i < 16; i++)
		stack[i] = mix(io->a + i, io->b);
	for (i = 0; i < 16; i++)
		sum += stack[(i * 7 + (io->c & 15)) & 15] ^ i;
	io->out[0] = sum;
	io->out[1] = fold(io->a) ^ fold(io->b);
	lc.acc = io->c;
	lc.seed = io->a;
	io->out[2] = bpf_loop((io->b & 31) + 1, step, &lc, 0);
	io->out[3] = lc.acc;
	sum = 0;
	for (i = 0; i < 64; i++) { /* a bounded loop over the frame's bytes */
		if (data + IO_OFF + i + 1 > end)
			break;
		sum = sum * 131 + data[IO_OFF + i];
	}
	io->out[4] = sum;
	io->out[5] = ctx->ingress_ifindex | (__u64)ctx->rx_queue_index << 32;
	return (int)(sum & 1) + 1;
}
