// SPDX-License-Identifier: Apache-2.0
/* Reference, not a candidate: ref_pcpu_array.bpf.c plus bpf_get_current_task(),
 * fetched and stored: what that helper costs on this hook. */
#include "common.h"

struct row {
	u64 last;
	u64 n[NCAP * 2]; /* [cap * 2 + denied] */
};
BPF_PERCPU_ARRAY(arr, struct row, 1);

int count(struct bpf_raw_tracepoint_args *ctx)
{
	u32 zero = 0;
	struct row *r = arr.lookup(&zero);
	if (!r)
		return 0;
	r->last = (u64)bpf_get_current_task();
	r->n[(HOOK_CAP(ctx) & (NCAP - 1)) * 2 + HOOK_DENIED(ctx)]++;
	return 0;
}
