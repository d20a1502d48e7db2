/* Byte swaps: to big endian and to little endian at 16, 32 and 64 bits (on a little-endian machine le16/le32
 * only truncate). */
#include "corpus.h"

#define N 6

SEC("xdp")
int endian(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);
	__u64 a;

	if (!io)
		return XDP_DROP;
	a = io->a;
	io->out[0] = UN64("%0 = be16 %0", a);
	io->out[1] = UN64("%0 = be32 %0", a);
	io->out[2] = UN64("%0 = be64 %0", a);
	io->out[3] = UN64("%0 = le16 %0", a);
	io->out[4] = UN64("%0 = le32 %0", a);
	io->out[5] = UN64("%0 = le64 %0", a);
	return XDP_PASS;
}
