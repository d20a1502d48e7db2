/* XDP multi-buffer (SEC("xdp.frags")): bpf_xdp_get_buff_len, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
 * bpf_xdp_adjust_tail and bpf_check_mtu over frames of a linear part and fragments, at offsets the frame
 * chooses (around the linear part's end, the fragments' boundaries, the frame's end, beyond 0xffff), with
 * every return value, length and loaded byte written back into the frame (the suite compares the whole
 * frame, fragments included, and the maps, engine against kernel). */
#include "corpus.h"

#define N 8
#define PAGE 4096

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 4);
} fstat SEC(".maps");

static __always_inline void add(__u32 key, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&fstat, &key);

	if (v)
		*v += n;
}

/* An offset of the frame chosen by `x`: anywhere (up to 0x1ffff), around the linear part's end, back from
 * the frame's end, or around the k-th fragment's end (fragments of PAGE bytes after the linear part). */
static __always_inline __u32 pick(__u64 x, __u32 linear, __u32 len)
{
	__u32 v = (x >> 8) & 0x1ffff;

	switch (x & 3) {
	case 0:
		return v;
	case 1:
		return linear + (v & 0xff) - 128;
	case 2:
		return len - (v & 0x1ff);
	default:
		return linear + PAGE * ((x >> 24) & 7) + (v & 0x3f) - 32;
	}
}

SEC("xdp.frags")
int frags_rw(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);
	unsigned char buf[64];
	__u64 a, b, c, fold = 0;
	__u32 linear, len, off, n, mtu = 0;
	long r1, r2, r3, r4;
	void *data, *end;
	int i;

	if (!io)
		return XDP_DROP;
	a = io->a, b = io->b, c = io->c;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	linear = end - data;
	len = bpf_xdp_get_buff_len(ctx);
	off = pick(a, linear, len);
	n = (b & 63) + 1;
	__builtin_memset(buf, 0, sizeof(buf));
	r1 = bpf_xdp_load_bytes(ctx, off, buf, n);
	for (i = 0; i < 64; i++)
		fold = fold * 31 + buf[i];
	for (i = 0; i < 64; i++)
		buf[i] = (unsigned char)(c >> (i & 7)) ^ i;
	r2 = bpf_xdp_store_bytes(ctx, pick(b >> 6, linear, len), buf, ((c >> 3) & 63) + 1);
	r3 = bpf_check_mtu(ctx, 0, &mtu, (int)(c >> 32), 0);
	r4 = bpf_xdp_load_bytes(ctx, a & 0x1ffff, buf, 64);  /* past the end / above 0xffff: errors */
	add(0, 1);
	add(1, len);
	add(2, r1 == 0);
	add(3, fold);
	io = io_of(ctx, N);
	if (!io)
		return XDP_ABORTED;
	io->out[0] = r1;
	io->out[1] = r2;
	io->out[2] = r3;
	io->out[3] = r4;
	io->out[4] = fold;
	io->out[5] = len | (__u64)linear << 32;
	io->out[6] = off | (__u64)n << 32;
	io->out[7] = mtu;
	return XDP_TX;
}

/* bpf_xdp_adjust_tail twice by amounts the frame gives (the full int range: shrinking past ETH_HLEN,
 * growing past the last fragment's tailroom, INT_MIN), then the whole length, the linear length and the
 * last 8 bytes of the frame (zeroed when it grew) written back. */
SEC("xdp.frags")
int frags_tail(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);
	__u64 b, c, last = 0;
	long r1, r2, r3;
	__u32 len1, len2;
	void *data, *end;

	if (!io)
		return XDP_DROP;
	b = io->b, c = io->c;
	r1 = bpf_xdp_adjust_tail(ctx, (int)b);
	len1 = bpf_xdp_get_buff_len(ctx);
	r2 = bpf_xdp_adjust_tail(ctx, (int)c);
	len2 = bpf_xdp_get_buff_len(ctx);
	r3 = bpf_xdp_load_bytes(ctx, len2 - 8, &last, 8);
	add(0, 1);
	add(1, len2);
	io = io_of(ctx, N);
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (!io)
		return XDP_PASS;  /* shrunk below the operands: the frame alone tells */
	io->out[0] = r1;
	io->out[1] = r2;
	io->out[2] = r3;
	io->out[3] = len1;
	io->out[4] = len2;
	io->out[5] = end - data;
	io->out[6] = last;
	return XDP_TX;
}
