/* The instruction-level corpus of the differential suite: each program reads its operands from the frame
 * (so that the frames choose the values: edge values and generated ones), runs the instructions under test
 * (written as inline asm where C would leave them to the compiler's choice or call them undefined), and
 * writes every result back into the frame, which the suite compares byte for byte, engine against kernel.
 *
 * Frame layout: 16 bytes of header room, then the operands a, b, c (u64 each, little-endian), then the
 * results out[0..]. A frame too short for them is XDP_DROP. */
#ifndef CORPUS_H
#define CORPUS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct io {
	__u64 a, b, c;
	__u64 out[];
};

#define IO_OFF 16

static __always_inline struct io *io_of(struct xdp_md *ctx, int nout)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct io *io = data + IO_OFF;

	if ((void *)io + sizeof(*io) + nout * 8 > end)
		return 0;
	return io;
}

/* dst = dst OP src, 64-bit (r registers) and 32-bit (w registers, zero-extended into the result). */
#define OP64(op, x, y) ({ __u64 _r = (x); asm volatile("%0 " op " %1" : "+r"(_r) : "r"((__u64)(y))); _r; })
#define OP32(op, x, y) ({ __u32 _r = (x); asm volatile("%0 " op " %1" : "+w"(_r) : "w"((__u32)(y))); (__u64)_r; })
#define OP64K(op, x, k) ({ __u64 _r = (x); asm volatile("%0 " op " " #k : "+r"(_r)); _r; })
#define OP32K(op, x, k) ({ __u32 _r = (x); asm volatile("%0 " op " " #k : "+w"(_r)); (__u64)_r; })
#define UN64(expr, x) ({ __u64 _r = (x); asm volatile(expr : "+r"(_r)); _r; })
#define UN32(expr, x) ({ __u32 _r = (x); asm volatile(expr : "+w"(_r)); (__u64)_r; })

char _license[] SEC("license") = "GPL";

#endif
