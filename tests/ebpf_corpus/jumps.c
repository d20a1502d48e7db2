/* Every conditional jump, 64- and 32-bit, register and immediate, signed and unsigned: one result bit per
 * jump taken, at the frame's operand values. */
#include "corpus.h"

#define N 4

#define J64(op, x, y) ({ __u64 _t = 1; asm volatile("if %1 " op " %2 goto +1; %0 = 0" : "+r"(_t) : "r"((__u64)(x)), "r"((__u64)(y))); _t; })
#define J32(op, x, y) ({ __u64 _t = 1; asm volatile("if %1 " op " %2 goto +1; %0 = 0" : "+r"(_t) : "w"((__u32)(x)), "w"((__u32)(y))); _t; })
#define J64K(op, x, k) ({ __u64 _t = 1; asm volatile("if %1 " op " " #k " goto +1; %0 = 0" : "+r"(_t) : "r"((__u64)(x))); _t; })
#define J32K(op, x, k) ({ __u64 _t = 1; asm volatile("if %1 " op " " #k " goto +1; %0 = 0" : "+r"(_t) : "w"((__u32)(x))); _t; })

#define ALL(J, x, y) (J("==", x, y) | J("!=", x, y) << 1 | J(">", x, y) << 2 | J(">=", x, y) << 3 |          \
		      J("<", x, y) << 4 | J("<=", x, y) << 5 | J("s>", x, y) << 6 | J("s>=", x, y) << 7 |   \
		      J("s<", x, y) << 8 | J("s<=", x, y) << 9 | J("&", x, y) << 10)

SEC("xdp")
int jumps(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);
	__u64 a, b;

	if (!io)
		return XDP_DROP;
	a = io->a, b = io->b;
	io->out[0] = ALL(J64, a, b);
	io->out[1] = ALL(J32, a, b);
	io->out[2] = ALL(J64K, a, -5);
	io->out[3] = ALL(J32K, a, 0x7fffffff) | ALL(J64K, b, 0) << 16;
	return XDP_TX;
}
