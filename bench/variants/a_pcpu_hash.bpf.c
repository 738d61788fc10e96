// SPDX-License-Identifier: Apache-2.0
/* (a) What bpf/capwatch.bpf.c does today: a per-CPU hash keyed by
 * (cgroup id, cap, verdict), one u64 per CPU. One hash lookup (16-byte key,
 * jhash) per check. */
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

int count(struct bpf_raw_tracepoint_args *ctx)
{
	struct cw_count_key k = {};
	k.cgroup_id = bpf_get_current_cgroup_id();
	k.cap = HOOK_CAP(ctx);
	k.denied = HOOK_DENIED(ctx);
	count_add(&k, 1);
	return 0;
}
