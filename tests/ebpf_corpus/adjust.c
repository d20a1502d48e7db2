/* bpf_xdp_adjust_head, _meta and _tail by amounts the frame chooses (some the kernel refuses: their
 * return values are compared too), with the frame read and written after each. */
#include "corpus.h"

#define N 4

SEC("xdp")
int adjust(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);
	__u64 a, b, c;
	long r1, r2, r3;
	void *data, *end, *meta;

	if (!io)
		return XDP_DROP;
	a = io->a, b = io->b, c = io->c;
	/* metadata: grow it, write through it, read it back, drop it again */
	r1 = bpf_xdp_adjust_meta(ctx, -(int)((a & 3) * 8 + 8));
	meta = (void *)(long)ctx->data_meta;
	data = (void *)(long)ctx->data;
	if (r1 == 0 && meta + 8 <= data) {
		*(__u64 *)meta = a ^ 0x5555;
		b ^= *(__u64 *)meta;
		bpf_xdp_adjust_meta(ctx, (int)(data - meta));
	}
	/* head: move by a signed amount the frame gives (-64..63; pulling past the data fails) */
	r2 = bpf_xdp_adjust_head(ctx, (int)(signed char)(c & 0xff) >> 1);
	/* tail: grow or shrink by -32..31 */
	r3 = bpf_xdp_adjust_tail(ctx, (int)((c >> 8) & 63) - 32);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (data + 40 > end)
		return XDP_DROP;
	((__u64 *)data)[0] = r1 | r2 << 16 | r3 << 32;
	((__u64 *)data)[1] = b;
	((__u64 *)data)[2] = (__u64)(end - data);
	((__u64 *)data)[3] = (__u64)(data - (void *)(long)ctx->data_meta);
	((__u64 *)data)[4] = bpf_xdp_get_buff_len(ctx);
	return XDP_TX;
}
