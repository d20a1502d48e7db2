/* The cpu v4 instructions (clang -mcpu=v4, clang >= 18): signed division and modulo, sign-extending moves
 * and loads, unconditional byte swaps, the 32-bit-offset goto. */
#include "corpus.h"

#define N 20

SEC("xdp")
int v4(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);
	__u64 a, b, r;
	int i = 0;

	if (!io)
		return XDP_DROP;
	a = io->a, b = io->b;
	io->out[i++] = OP64("s/=", a, b);
	io->out[i++] = OP64("s%%=", a, b);
	io->out[i++] = OP32("s/=", a, b);
	io->out[i++] = OP32("s%%=", a, b);
	io->out[i++] = OP64K("s/=", a, -3);
	io->out[i++] = OP64K("s%%=", a, -3);
	io->out[i++] = OP32K("s/=", a, -3);
	io->out[i++] = OP32K("s%%=", a, -3);
	asm volatile("%0 = (s8)%1" : "=r"(r) : "r"(a)); io->out[i++] = r;
	asm volatile("%0 = (s16)%1" : "=r"(r) : "r"(a)); io->out[i++] = r;
	asm volatile("%0 = (s32)%1" : "=r"(r) : "r"(a)); io->out[i++] = r;
	{ __u32 w; asm volatile("%0 = (s8)%1" : "=w"(w) : "w"((__u32)a)); io->out[i++] = w; }
	{ __u32 w; asm volatile("%0 = (s16)%1" : "=w"(w) : "w"((__u32)a)); io->out[i++] = w; }
	io->out[i++] = UN64("%0 = bswap16 %0", a);
	io->out[i++] = UN64("%0 = bswap32 %0", a);
	io->out[i++] = UN64("%0 = bswap64 %0", a);
	io->out[i++] = *(volatile signed char *)&io->b;   /* ldsx */
	io->out[i++] = *(volatile short *)&io->b;
	io->out[i++] = *(volatile int *)&io->b;
	asm volatile("%0 += 1; gotol +0; %0 += 2" : "=r"(r) : "0"(a)); io->out[i++] = r;
	return XDP_PASS;
}
