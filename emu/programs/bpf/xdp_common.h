/* What the bundled XDP programs share: the kernel's UAPI and libbpf's helper declarations (Debian's
 * linux-libc-dev and libbpf-dev), and the MAC swap every forwarding program does. */
#ifndef XDP_COMMON_H
#define XDP_COMMON_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Swap destination and source MAC in place; the caller has checked 12 bytes are there. */
static __always_inline void swap_macs(unsigned char *p)
{
	unsigned char tmp[ETH_ALEN];

	__builtin_memcpy(tmp, p, ETH_ALEN);
	__builtin_memcpy(p, p + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(p + ETH_ALEN, tmp, ETH_ALEN);
}

/* A per-CPU array of u64 counters, as samples/bpf's rxcnt. */
#define RXCNT_MAP(n)                                                                                   \
	struct {                                                                                       \
		__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);                                               \
		__type(key, __u32);                                                                    \
		__type(value, __u64);                                                                  \
		__uint(max_entries, n);                                                                \
	} rxcnt SEC(".maps")

static __always_inline void count(void *map, __u32 key, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(map, &key);

	if (v)
		*v += n;
}

#endif
