/* Atomics on a map value: add, or, and, xor (plain and fetch forms), xchg, cmpxchg, 64- and 32-bit; the
 * fetched values go to the frame, the final values stay in the map. */
#include "corpus.h"

#define N 12

struct cell {
	__u64 q[6];
	__u32 w[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct cell);
	__uint(max_entries, 2);
} cells SEC(".maps");

SEC("xdp")
int atomics(struct xdp_md *ctx)
{
	struct io *io = io_of(ctx, N);
	struct cell *v;
	__u32 key = 0;
	__u64 a, b;

	if (!io)
		return XDP_DROP;
	a = io->a, b = io->b;
	key = io->c & 1;
	v = bpf_map_lookup_elem(&cells, &key);
	if (!v)
		return XDP_ABORTED;
	__sync_fetch_and_add(&v->q[0], a);           /* lock add, result unused */
	io->out[0] = __sync_fetch_and_add(&v->q[0], b);
	io->out[1] = __sync_fetch_and_or(&v->q[1], a);
	io->out[2] = __sync_fetch_and_and(&v->q[2], ~a);
	io->out[3] = __sync_fetch_and_xor(&v->q[3], a);
	io->out[4] = __sync_lock_test_and_set(&v->q[4], a);
	io->out[5] = __sync_val_compare_and_swap(&v->q[5], b, a);
	__sync_fetch_and_add(&v->w[0], (__u32)a);
	io->out[6] = __sync_fetch_and_add(&v->w[0], (__u32)b);
	io->out[7] = __sync_fetch_and_or(&v->w[1], (__u32)a);
	io->out[8] = __sync_fetch_and_and(&v->w[2], (__u32)~a);
	io->out[9] = __sync_fetch_and_xor(&v->w[3], (__u32)a);
	io->out[10] = __sync_lock_test_and_set(&v->w[4], (__u32)a);
	io->out[11] = __sync_val_compare_and_swap(&v->w[5], (__u32)b, (__u32)a);
	return XDP_PASS;
}
