// SPDX-License-Identifier: Apache-2.0
/* Reference, not a candidate: ref_pcpu_array.bpf.c plus the cgroup id,
 * fetched and stored but not used as a key (so NOT exact per cgroup). The
 * lower bound of any design that asks for the cgroup id on every check. */
#include "common.h"

struct row {
	u64 last_cgroup;
	u64 n[NCAP * 2]; /* [cap * 2 + denied]: bcc 0.26 sizes 2-D arrays wrongly (half) */
};
BPF_PERCPU_ARRAY(arr, struct row, 1);

int count(struct bpf_raw_tracepoint_args *ctx)
{
	u32 zero = 0;
	struct row *r = arr.lookup(&zero);
	if (!r)
		return 0;
	r->last_cgroup = bpf_get_current_cgroup_id();
	r->n[(HOOK_CAP(ctx) & (NCAP - 1)) * 2 + HOOK_DENIED(ctx)]++;
	return 0;
}
