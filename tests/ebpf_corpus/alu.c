/* Every ALU operation, 64- and 32-bit, register and immediate sources, at the frame's operand values:
 * division and modulo by zero, shifts by the operand (masked to the width), negation, moves. */
#include "corpus.h"

#define N 48

SEC("xdp")
int alu(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);
	__u64 a, b, c;
	int i = 0;

	if (!io)
		return XDP_DROP;
	a = io->a, b = io->b, c = io->c;
	io->out[i++] = OP64("+=", a, b);
	io->out[i++] = OP64("-=", a, b);
	io->out[i++] = OP64("*=", a, b);
	io->out[i++] = OP64("/=", a, b);
	io->out[i++] = OP64("%%=", a, b);
	io->out[i++] = OP64("|=", a, b);
	io->out[i++] = OP64("&=", a, b);
	io->out[i++] = OP64("^=", a, b);
	io->out[i++] = OP64("<<=", a, c);
	io->out[i++] = OP64(">>=", a, c);
	io->out[i++] = OP64("s>>=", a, c);
	io->out[i++] = UN64("%0 = -%0", a);
	io->out[i++] = OP32("+=", a, b);
	io->out[i++] = OP32("-=", a, b);
	io->out[i++] = OP32("*=", a, b);
	io->out[i++] = OP32("/=", a, b);
	io->out[i++] = OP32("%%=", a, b);
	io->out[i++] = OP32("|=", a, b);
	io->out[i++] = OP32("&=", a, b);
	io->out[i++] = OP32("^=", a, b);
	io->out[i++] = OP32("<<=", a, c);
	io->out[i++] = OP32(">>=", a, c);
	io->out[i++] = OP32("s>>=", a, c);
	io->out[i++] = UN32("%0 = -%0", a);
	io->out[i++] = OP32("=", a, b);            /* mov32: zero-extends */
	io->out[i++] = OP64K("+=", a, -1);
	io->out[i++] = OP64K("*=", a, -7);
	io->out[i++] = OP64K("/=", a, 7);
	io->out[i++] = OP64K("%%=", a, 7);
	io->out[i++] = OP64K("|=", a, -2147483648);
	io->out[i++] = OP64K("&=", a, -2);
	io->out[i++] = OP64K("^=", a, 0x7fffffff);
	io->out[i++] = OP64K("<<=", a, 63);
	io->out[i++] = OP64K(">>=", a, 63);
	io->out[i++] = OP64K("s>>=", a, 63);
	io->out[i++] = OP64K("=", a, -1);          /* mov64 imm: sign-extended */
	io->out[i++] = OP32K("+=", a, -1);
	io->out[i++] = OP32K("*=", a, -7);
	io->out[i++] = OP32K("/=", a, 7);
	io->out[i++] = OP32K("%%=", a, 7);
	io->out[i++] = OP32K("|=", a, -2147483648);
	io->out[i++] = OP32K("&=", a, -2);
	io->out[i++] = OP32K("^=", a, 0x7fffffff);
	io->out[i++] = OP32K("<<=", a, 31);
	io->out[i++] = OP32K(">>=", a, 31);
	io->out[i++] = OP32K("s>>=", a, 31);
	io->out[i++] = OP32K("=", a, -1);
	io->out[i++] = OP64K("-=", a, 0);
	return (int)(a ^ b) & 3;  /* r0 from the operands too */
}
