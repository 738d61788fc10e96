// SPDX-License-Identifier: Apache-2.0
/* (d) One shared hash keyed (cgroup id, cap, verdict), incremented with an
 * atomic add: is per-CPU storage worth its memory (values x CPUs)? */
#include "common.h"

BPF_HASH(counts, struct cw_count_key, u64, 65536);

int count(struct bpf_raw_tracepoint_args *ctx)
{
	struct cw_count_key k = {};
	k.cgroup_id = bpf_get_current_cgroup_id();
	k.cap = HOOK_CAP(ctx);
	k.denied = HOOK_DENIED(ctx);
	u64 *v = counts.lookup(&k);
	if (v) {
		__sync_fetch_and_add(v, 1);
		return 0;
	}
	u64 one = 1;
	if (counts.insert(&k, &one) != 0) {
		v = counts.lookup(&k);
		if (v)
			__sync_fetch_and_add(v, 1);
	}
	return 0;
}
