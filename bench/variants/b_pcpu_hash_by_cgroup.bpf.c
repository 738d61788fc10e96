// SPDX-License-Identifier: Apache-2.0
/* (b) A per-CPU hash keyed by the cgroup id alone (8-byte key); the value is a
 * row of u64[NCAP][2] counters indexed by cap and verdict. Still one hash
 * lookup per check, on a shorter key. Cost in memory: 1 KiB per cgroup per
 * CPU (not preallocated here). */
#include "common.h"

struct row {
	u64 n[NCAP * 2]; /* [cap * 2 + denied]: bcc 0.26 sizes 2-D arrays wrongly (half) */
};
BPF_F_TABLE("percpu_hash", u64, struct row, bycg, 10240, BPF_F_NO_PREALLOC);
/* A zeroed row to insert from: 1 KiB does not fit on the 512-byte BPF stack. */
BPF_ARRAY(zero_row, struct row, 1);
BPF_PERCPU_HASH(overflow, struct cw_count_key, u64, 1024);

/* Add n to (map)[k]; -EEXIST on insert: another CPU inserted the key first
 * (on a per-CPU map our slot starts at zero): look up again. */
static __always_inline void count_add(struct cw_count_key *k, u64 n)
{
	u64 *v = overflow.lookup(k);
	if (v) {
		*v += n;
		return;
	}
	if (overflow.insert(k, &n) != 0) {
		v = overflow.lookup(k);
		if (v)
			*v += n;
	}
}

int count(struct bpf_raw_tracepoint_args *ctx)
{
	u64 cg = bpf_get_current_cgroup_id();
	s32 cap = HOOK_CAP(ctx);
	u32 denied = HOOK_DENIED(ctx);
	if ((u32)cap >= NCAP) {
		struct cw_count_key k = {.cgroup_id = cg, .cap = cap, .denied = denied};
		count_add(&k, 1);
		return 0;
	}
	struct row *r = bycg.lookup(&cg);
	if (!r) {
		u32 zero = 0;
		struct row *z = zero_row.lookup(&zero);
		if (!z)
			return 0;
		bycg.insert(&cg, z); /* -EEXIST is fine: look up again */
		r = bycg.lookup(&cg);
		if (!r)
			return 0;
	}
	r->n[(cap & (NCAP - 1)) * 2 + (denied & 1)]++;
	return 0;
}
