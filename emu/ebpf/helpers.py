"""The eBPF helpers and map types the emulator supports: one table, read by the ELF loader (which refuses
anything else at load time), the engine, ``emu inspect`` and the docs.

Helper ids and names are the kernel's (``enum bpf_func_id`` in include/uapi/linux/bpf.h, ``BPF_FUNC_``
dropped); map type ids and names are ``enum bpf_map_type``'s (``BPF_MAP_TYPE_`` dropped, lower case as
bpftool prints them).
"""

from __future__ import annotations

from emu.ebpf import obj

__all__ = ["HELPERS", "HELPER_NAMES", "KERNEL_HELPER_NAMES", "KERNEL_MAP_TYPE_NAMES", "MAP_TYPES",
           "MAP_TYPE_NAMES", "helper_name", "map_type_name"]

# (id, name) of every helper an object may call; the engine implements each with the kernel's semantics.
HELPERS: tuple[tuple[int, str], ...] = (
    (1, "map_lookup_elem"),
    (2, "map_update_elem"),
    (3, "map_delete_elem"),
    (5, "ktime_get_ns"),
    (6, "trace_printk"),
    (7, "get_prandom_u32"),
    (8, "get_smp_processor_id"),
    (12, "tail_call"),
    (23, "redirect"),
    (25, "perf_event_output"),
    (28, "csum_diff"),
    (44, "xdp_adjust_head"),
    (51, "redirect_map"),
    (54, "xdp_adjust_meta"),
    (65, "xdp_adjust_tail"),
    (118, "jiffies64"),
    (125, "ktime_get_boot_ns"),
    (130, "ringbuf_output"),
    (163, "check_mtu"),
    (181, "loop"),
    (188, "xdp_get_buff_len"),
    (189, "xdp_load_bytes"),
    (190, "xdp_store_bytes"),
    (195, "map_lookup_percpu_elem"),
)
HELPER_NAMES: dict[int, str] = dict(HELPERS)

# (id, name) of every map type an object may define.
MAP_TYPES: tuple[tuple[int, str], ...] = (
    (obj.BPF_MAP_TYPE_HASH, "hash"),
    (obj.BPF_MAP_TYPE_ARRAY, "array"),
    (obj.BPF_MAP_TYPE_PROG_ARRAY, "prog_array"),
    (obj.BPF_MAP_TYPE_PERF_EVENT_ARRAY, "perf_event_array"),
    (obj.BPF_MAP_TYPE_PERCPU_HASH, "percpu_hash"),
    (obj.BPF_MAP_TYPE_PERCPU_ARRAY, "percpu_array"),
    (obj.BPF_MAP_TYPE_LRU_HASH, "lru_hash"),
    (obj.BPF_MAP_TYPE_LRU_PERCPU_HASH, "lru_percpu_hash"),
    (obj.BPF_MAP_TYPE_DEVMAP, "devmap"),
    (obj.BPF_MAP_TYPE_DEVMAP_HASH, "devmap_hash"),
    (obj.BPF_MAP_TYPE_RINGBUF, "ringbuf"),
)
MAP_TYPE_NAMES: dict[int, str] = dict(MAP_TYPES)

# Names of some of the kernel's other helpers, so that a refusal names the helper instead of a bare number
# (unknown ids print as "helper N").
KERNEL_HELPER_NAMES: dict[int, str] = {
    **HELPER_NAMES,
    4: "probe_read", 9: "skb_store_bytes", 10: "l3_csum_replace", 11: "l4_csum_replace",
    14: "get_current_pid_tgid", 16: "get_current_comm", 26: "skb_load_bytes", 69: "fib_lookup",
    84: "sk_lookup_tcp", 85: "sk_lookup_udp", 86: "sk_release", 87: "map_push_elem", 88: "map_pop_elem",
    89: "map_peek_elem", 93: "spin_lock", 94: "spin_unlock", 131: "ringbuf_reserve", 132: "ringbuf_submit",
    133: "ringbuf_discard", 134: "ringbuf_query",
}

KERNEL_MAP_TYPE_NAMES: dict[int, str] = {
    **MAP_TYPE_NAMES,
    7: "stack_trace", 8: "cgroup_array", 11: "lpm_trie", 12: "array_of_maps", 13: "hash_of_maps",
    15: "sockmap", obj.BPF_MAP_TYPE_CPUMAP: "cpumap", 17: "xskmap", 18: "sockhash", 19: "cgroup_storage",
    20: "reuseport_sockarray", 21: "percpu_cgroup_storage", 22: "queue", 23: "stack", 24: "sk_storage",
    26: "struct_ops", 28: "inode_storage", 29: "task_storage", 30: "bloom_filter", 31: "user_ringbuf",
    32: "cgrp_storage", 33: "arena",
}


def helper_name(helper_id: int) -> str:
    """The kernel's name of a helper id (``"helper 999"`` for one the table does not know)."""
    return KERNEL_HELPER_NAMES.get(helper_id, f"helper {helper_id}")


def map_type_name(map_type: int) -> str:
    """The kernel's name of a map type id (``"map type 99"`` for one the table does not know)."""
    return KERNEL_MAP_TYPE_NAMES.get(map_type, f"map type {map_type}")
