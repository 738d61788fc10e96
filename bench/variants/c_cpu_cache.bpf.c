// SPDX-License-Identifier: Apache-2.0
/* (c) A per-CPU cache of the last cgroup seen on this CPU and its counters,
 * in front of the map of (a). A check from the cached cgroup costs an inlined
 * per-CPU array lookup (Linux 6.10 inlines PERCPU_ARRAY lookups) and one add;
 * when another cgroup's check comes to this CPU, the cache is flushed into the
 * per-CPU hash (one hash update per non-zero counter) and re-keyed.
 *
 * Exactness. Each CPU's cache and each CPU's slot of the hash are written only
 * by this program on that CPU, and a tracepoint program runs with preemption
 * disabled and a per-program recursion guard (kernel/trace/bpf_trace.c,
 * __bpf_trace_run), so increments are never lost. What a reader can get wrong
 * is a flush racing with its read: counts moved from the cache into the hash
 * between the two reads are seen twice (or not at all). The flush is
 * therefore bracketed by sequence numbers: seq_tail is bumped before the
 * flush, seq_head after it. User space copies the cache with one map lookup,
 * which reads a CPU's value in ascending address order: seq_head first,
 * seq_tail last; head != tail means a flush overlapped the copy. Reading the
 * caches, then the hash, then the caches again, and retrying unless every
 * CPU's sequence is unchanged and even, gives hash + cache = the exact count
 * (bench/bench_overhead.py, read_cached_counts). Ordering: x86 keeps stores
 * in order and loads in order; the compiler is held by barriers. Other
 * architectures would need smp_wmb/smp_rmb equivalents. */
#include "common.h"

BPF_PERCPU_HASH(counts, struct cw_count_key, u64, 65536);

/* Add n to (map)[k]; -EEXIST on insert: another CPU inserted the key first
 * (on a per-CPU map our slot starts at zero): look up again. */
static __always_inline void count_add(struct cw_count_key *k, u64 n)
{
	u64 *v = counts.lookup(k);
	if (v) {
		*v += n;
		return;
	}
	if (counts.insert(k, &n) != 0) {
		v = counts.lookup(k);
		if (v)
			*v += n;
	}
}

struct cpu_cache {
	u64 seq_head;  /* first in memory: read first by user space */
	u64 cgroup_id; /* the cgroup whose checks n[] counts */
	u64 n[NCAP * 2]; /* [cap * 2 + denied]: bcc 0.26 sizes 2-D arrays wrongly (half) */
	u64 seq_tail; /* last in memory: read last */
};
BPF_PERCPU_ARRAY(cache, struct cpu_cache, 1);

#ifndef barrier
#define barrier() asm volatile("" ::: "memory")
#endif

static __always_inline void flush(struct cpu_cache *c)
{
	struct cw_count_key k = {};
	k.cgroup_id = c->cgroup_id;
	for (int i = 0; i < NCAP * 2; i++) {
		u64 n = c->n[i];
		if (!n)
			continue;
		k.cap = i >> 1;
		k.denied = i & 1;
		count_add(&k, n);
		c->n[i] = 0;
	}
}

int count(struct bpf_raw_tracepoint_args *ctx)
{
	u32 zero = 0;
	s32 cap = HOOK_CAP(ctx);
	u32 denied = HOOK_DENIED(ctx);
	u64 cg = bpf_get_current_cgroup_id();
	struct cpu_cache *c = cache.lookup(&zero);
	if (!c)
		return 0;
	if (c->cgroup_id != cg) {
		u64 seq = c->seq_head + 1;
		c->seq_tail = seq;
		barrier();
		flush(c);
		c->cgroup_id = cg;
		barrier();
		c->seq_head = seq;
	}
	if ((u32)cap < NCAP) {
		c->n[(cap & (NCAP - 1)) * 2 + (denied & 1)]++;
	} else {
		struct cw_count_key k = {.cgroup_id = cg, .cap = cap, .denied = denied};
		count_add(&k, 1);
	}
	return 0;
}
