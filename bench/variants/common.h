/* SPDX-License-Identifier: Apache-2.0 */
/* Shared by the counting variants: the hook's arguments and the key of the
 * exact count map as bpf/capwatch.h defines it. Each variant defines
 * `int count(struct bpf_raw_tracepoint_args *ctx)`; the benchmark attaches it
 * to the raw tracepoint cap_capable (args: cred, target_ns, capable_ns, cap,
 * ret) and detaches it between runs. */
#ifndef BENCH_VARIANTS_COMMON_H
#define BENCH_VARIANTS_COMMON_H

/* Capabilities counted in a fixed-size row; CAP_LAST_CAP is 40 in Linux 6.18
 * (CAP_CHECKPOINT_RESTORE). Higher numbers go to the hash, one key each. */
#define NCAP 64

struct cw_count_key {
	u64 cgroup_id;
	s32 cap;
	u32 denied;
};

#define HOOK_CAP(ctx) ((s32)(ctx)->args[3])
#define HOOK_DENIED(ctx) ((u32)((s32)(ctx)->args[4] != 0))

#endif
