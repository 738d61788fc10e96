// SPDX-License-Identifier: Apache-2.0
/* capwatch: every capability check, counted exactly in the kernel; the
 * detail of denials (and, when asked, of every check) sent to user space
 * through BPF ring buffers.
 *
 * Compiled by BCC. Everything that varies is chosen with -D flags by
 * capwatch/_bpf.py, never by editing this text:
 *   CW_ATTACH_RAW_TP | CW_ATTACH_TP | CW_ATTACH_FEXIT | CW_ATTACH_KPROBE
 *   CW_NO_AUTOATTACH   name the programs so BCC does not attach them (verifier tests)
 *   CW_SELF_PID        capwatch's own tgid: its checks are not reported
 *   CW_EMIT_ALL        send allowed checks too (to the checks ring)
 *   CW_UNIQUE          send only the first allowed check of each distinct tuple
 *   CW_FILTER_PID, CW_FILTER_CAP, CW_FILTER_CGROUP   restrict what is sent
 *                      (never what is counted)
 *   CW_OUTCOME         each denial's syscall result; process exit status after
 *                      a denial in a send-family syscall that succeeded
 *   CW_REFUSALS        EPERM/EACCES without a capability denial, for the
 *                      filtered target only (needs CW_OUTCOME and a filter)
 *   CW_REFUSAL_CGROUPS the refusal filter is the refusal_cgroups map instead:
 *                      1 = only the cgroups it holds (a pod's containers),
 *                      2 = all but the cgroups it holds (those that existed
 *                      before a command started its container)
 *   CW_REFUSAL_ENTRY   note what the target's threads enter (raw sys_enter), so
 *                      that a refusal at entry (seccomp) is known as such
 *   CW_DENIAL_PAGES, CW_CHECK_PAGES  ring sizes in pages (powers of two)
 *   CW_RL_BURST, CW_RL_WINDOW_NS     per-(cgroup, tgid, cap, syscall) denial rate limit
 *   CW_CG_BURST        per-cgroup denial budget (same window)
 *   CW_COUNT_ENTRIES, CW_HELD_ENTRIES   sizes of the count and held maps
 *
 * It reads no kernel struct: only helpers, hook arguments and pt_regs, so a
 * header tree from another kernel version compiles it correctly.
 */
#include <uapi/linux/ptrace.h> /* struct pt_regs: ABI */
#if defined(CW_ATTACH_FEXIT) || defined(CW_ATTACH_KPROBE)
/* cap_capable's 4th argument (opts or audit) is decided from these headers. */
#include <linux/security.h>
#endif

/* Only ever used as an opaque pointer: no layout is read. Not including
 * <linux/sched.h> also cuts BCC's compile time from 3.4 s to 0.8 s here. */
struct task_struct;

#include "capwatch.h"

#ifndef CW_SELF_PID
#define CW_SELF_PID 0
#endif
#ifndef CW_DENIAL_PAGES
#define CW_DENIAL_PAGES 256
#endif
#ifndef CW_CHECK_PAGES
#define CW_CHECK_PAGES 4096
#endif
#ifndef CW_RL_BURST
#define CW_RL_BURST 200
#endif
#ifndef CW_RL_WINDOW_NS
#define CW_RL_WINDOW_NS 1000000000ULL
#endif
#ifndef CW_CG_BURST
#define CW_CG_BURST 1000
#endif
#ifndef CW_COUNT_ENTRIES
#define CW_COUNT_ENTRIES 65536
#endif
#ifndef CW_HELD_ENTRIES
#define CW_HELD_ENTRIES 16384
#endif
/* Force a consumer wake-up once per this many records on the checks ring;
 * between them records are submitted with BPF_RB_NO_WAKEUP so that batches
 * grow under load (the consumer also drains on a short timer). */
#ifndef CW_WAKE_EVERY
#define CW_WAKE_EVERY 2048
#endif

/* Denials and other checks go to separate rings so that a flood of allowed
 * checks can never take the room that denials need. */
BPF_RINGBUF_OUTPUT(denials, CW_DENIAL_PAGES);
#if defined(CW_EMIT_ALL) || defined(CW_UNIQUE)
BPF_RINGBUF_OUTPUT(checks, CW_CHECK_PAGES);
BPF_PERCPU_ARRAY(wake, u64, 1);
#endif

/* Exact counts by (cgroup, capability, verdict). Per-CPU values: no atomic
 * instruction on the hot path; user space sums the CPUs when it reads.
 * LRU, so that no tenant can take the map over: when it is full, an insert
 * evicts the least recently used entry (a dead or idle cgroup's: a live
 * workload touches its entries at every flush), where a plain hash would
 * refuse every later workload. User space keeps what it last read of an
 * evicted entry (capwatch/tally.py) and counts evictions exactly from
 * CW_STAT_COUNT_NEW. */
BPF_TABLE("lru_percpu_hash", struct cw_count_key, u64, counts, CW_COUNT_ENTRIES);
/* Denials not sent (struct cw_held_key, capwatch.h), LRU for the same reason. */
BPF_TABLE("lru_percpu_hash", struct cw_held_key, u64, held, CW_HELD_ENTRIES);
BPF_PERCPU_ARRAY(stats, u64, CW_STAT_NR);

/* The initial user namespace's address, learnt from capwatch's own checks
 * (its capable() calls name &init_user_ns): never leaves the kernel. */
BPF_ARRAY(initns, u64, 1);

/* Two limits in front of the denial ring, on the denial path only:
 * - per (cgroup, tgid, cap, syscall), CW_RL_BURST a window: a flood of one
 *   kind of denial (an "expected" probe) never holds back another kind (a
 *   real mount or setns refusal), nor another process's denials of the same
 *   kind, which are sent on their own budget;
 * - per cgroup, CW_CG_BURST a window: many processes in one cgroup flooding
 *   many kinds cannot fill the ring and cost another cgroup its denials;
 * - per uid other than root, the same budget over all its cgroups: a user
 *   with a delegated cgroup subtree cannot multiply budgets by making
 *   cgroups (root in a container cannot make cgroups).
 * A denial held back is not lost: it is counted in the held map by
 * (cgroup, cap, syscall) and classified there by user space. An LRU eviction
 * of a limiter entry only restarts that limiter's window. */
struct cw_rl_key {
	u64 cgroup_id;
	u32 pid;
	s32 cap;
	s32 syscall_nr;
	u32 pad;
};
struct cw_rl_val {
	u64 window_start;
	u64 sent;
	u64 suppressed; /* 64-bit: BPF atomics on 32-bit words need newer LLVM */
};
BPF_TABLE("lru_hash", struct cw_rl_key, struct cw_rl_val, ratelimit, 10240);
struct cw_budget {
	u64 window_start;
	u64 sent;
};
BPF_TABLE("lru_hash", u64, struct cw_budget, cg_budget, 4096);

#ifdef CW_OUTCOME
/* Outcome mode: denials made inside a syscall are remembered per thread; on
 * syscall exit one CW_F_OUTCOME record carries the syscall's return value,
 * after the thread's denial records in the same ring. The sys_exit hook runs
 * on every syscall of the node, so it first reads one shared counter of
 * pending threads and returns at once when it is zero (the common case). */
BPF_TABLE("lru_hash", u32, u32, pending, 16384);
/* Known limit: an entry whose syscall never returns (exit_group, an execve by
 * a non-leader thread, which changes the tid) or that the LRU evicts is never
 * deleted here, so the counter stays above zero and every syscall then pays a
 * hash delete until capwatch restarts. Such denials are reported
 * with an unknown outcome after 2 s by user space. */
BPF_ARRAY(pending_gate, u64, 1);
#endif

#ifdef CW_UNIQUE
struct cw_seen_key {
	u64 cgroup_id;
	s32 cap;
	s32 syscall_nr;
	u32 denied;
	u32 pad;
	char comm[CW_COMM_LEN];
};
BPF_TABLE("lru_hash", struct cw_seen_key, u8, seen, 65536);
#endif

static __always_inline void stat_inc(u32 idx)
{
	u64 *v = stats.lookup(&idx);
	if (v)
		(*v)++;
}

/* In front of the count map, a per-CPU cache of the last cgroup seen on this
 * CPU and its counters (struct cw_cache, capwatch.h). A check from the cached
 * cgroup costs a per-CPU array lookup (inlined since Linux 6.10) and one add;
 * a check from another cgroup first flushes the cache into the hash. Measured
 * (bench/bench_overhead.py): 1.55x the empty program's cost, against 2.24x for
 * a hash update on every check.
 *
 * Exactness: each CPU's cache and each CPU's slot of the hash are written only
 * by this program on that CPU, with preemption off (__bpf_trace_run), so no
 * increment is lost. A reader racing a flush could count moved counts twice
 * or not at all, so a flush is bracketed: seq_tail is bumped before it and
 * seq_head after it. User space reads the caches, the hash, then the caches
 * again, and retries unless every CPU's sequence is unchanged and even
 * (capwatch/_bpf.py, read_counts). x86 keeps stores in order; the compiler is
 * held by barriers. Other architectures need smp_wmb/smp_rmb equivalents. */
BPF_PERCPU_ARRAY(count_cache, struct cw_cache, 1);

#ifndef barrier
#define barrier() asm volatile("" ::: "memory")
#endif

static __always_inline void count_add(struct cw_count_key *k, u64 n)
{
	u64 *v = counts.lookup(k);
	if (v) {
		*v += n;
		return;
	}
	if (counts.insert(k, &n) == 0) {
		stat_inc(CW_STAT_COUNT_NEW);
		return;
	}
	v = counts.lookup(k);
	if (v)
		*v += n;
	else
		stat_inc(CW_STAT_COUNT_FAIL);
}

/* A denial not sent: counted by (cgroup, cap, syscall). Denial path only. */
static __always_inline void hold(u64 cg, s32 cap, s32 nr)
{
	struct cw_held_key hk = {.cgroup_id = cg, .cap = cap, .syscall_nr = nr};
	u64 *v = held.lookup(&hk);
	if (v) {
		(*v)++;
		return;
	}
	u64 one = 1;
	if (held.insert(&hk, &one) == 0) {
		stat_inc(CW_STAT_HELD_NEW);
		return;
	}
	v = held.lookup(&hk);
	if (v)
		(*v)++;
	else
		stat_inc(CW_STAT_HELD_FAIL);
}

/* A budget's key: a cgroup id, or a uid tagged with the top bit (a cgroup
 * id is an inode number, never that large). */
#define CW_UID_BUDGET_KEY (1ULL << 63)

/* The cgroup's (or uid's) budget for this window: 1 while it has room. */
static __always_inline int budget_take(u64 cg, u64 now)
{
	struct cw_budget *b = cg_budget.lookup(&cg);
	if (!b) {
		struct cw_budget nb = {.window_start = now};
		cg_budget.update(&cg, &nb);
		b = cg_budget.lookup(&cg);
		if (!b)
			return 1;
	}
	if (now - b->window_start > CW_RL_WINDOW_NS) {
		b->window_start = now;
		b->sent = 0;
	}
	if (b->sent >= CW_CG_BURST)
		return 0;
	b->sent++;
	return 1;
}

static __always_inline u64 count_check(s32 cap, u32 denied)
{
	u32 zero = 0;
	u64 cg = bpf_get_current_cgroup_id();
	struct cw_cache *c = count_cache.lookup(&zero);
	if (!c)
		return cg;
	if (c->cgroup_id != cg) {
		u64 seq = c->seq_head + 1;
		c->seq_tail = seq;
		barrier();
		struct cw_count_key k = {.cgroup_id = c->cgroup_id};
		for (int i = 0; i < CW_NCAP * 2; i++) {
			u64 n = c->n[i];
			if (!n)
				continue;
			k.cap = i >> 1;
			k.denied = i & 1;
			count_add(&k, n);
			c->n[i] = 0;
		}
		c->cgroup_id = cg;
		barrier();
		c->seq_head = seq;
	}
	if ((u32)cap < CW_NCAP) {
		c->n[CW_CACHE_SLOT(cap, denied)]++;
	} else {
		struct cw_count_key k = {.cgroup_id = cg, .cap = cap, .denied = denied};
		count_add(&k, 1);
	}
	return cg;
}

static __always_inline s32 current_syscall(void)
{
	/* bpf_task_pt_regs (Linux 5.15, commit dd6e10fbd9fb) gives the user
	 * registers saved at syscall entry; orig_ax holds the syscall number on
	 * x86_64 (-1 outside a syscall). pt_regs is ABI, not a kernel struct
	 * whose layout moves between versions. */
#if defined(__x86_64__) || defined(__TARGET_ARCH_x86)
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	return (s32)regs->orig_ax;
#elif defined(__aarch64__) || defined(__TARGET_ARCH_arm64)
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	return (s32)regs->syscallno;
#else
	return -1;
#endif
}

static __always_inline int cw_handle(void *ctx, s32 cap, s32 ret, u64 ns, u32 opts_flags)
{
	u32 zero = 0;
	u32 denied = ret != 0;
	struct cw_count_key key = {};
	key.cgroup_id = count_check(cap, denied);
#if !defined(CW_EMIT_ALL) && !defined(CW_UNIQUE)
	if (!denied) {
		/* Counted; nothing else to do unless the initial user namespace is
		 * still to be learnt from capwatch's own checks. */
		u64 *known = initns.lookup(&zero);
		if (known && *known)
			return 0;
	}
#endif
	/* capwatch's own checks are counted (they are real checks in its
	 * cgroup) but never streamed. */
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tgid = pid_tgid >> 32;

	if (tgid == CW_SELF_PID) {
		u64 *init = initns.lookup(&zero);
		if (init && *init == 0)
			*init = ns;
		stat_inc(CW_STAT_OWN_CHECKS);
		return 0;
	}

#ifdef CW_FILTER_PID
	if (tgid != CW_FILTER_PID)
		return 0;
#endif
#ifdef CW_FILTER_CAP
	if (cap != CW_FILTER_CAP)
		return 0;
#endif
#ifdef CW_FILTER_CGROUP
	if (key.cgroup_id != CW_FILTER_CGROUP)
		return 0;
#endif

#if !defined(CW_EMIT_ALL) && !defined(CW_UNIQUE)
	if (!denied)
		return 0;
#endif
	s32 nr = current_syscall();
	u32 suppressed = 0;
	if (denied) {
		struct cw_rl_key rk = {.cgroup_id = key.cgroup_id,
				       .pid = tgid,
				       .cap = cap,
				       .syscall_nr = nr,
				       .pad = 0};
		u64 now = bpf_ktime_get_ns();
		struct cw_rl_val *rv = ratelimit.lookup(&rk);
		if (!rv) {
			struct cw_rl_val nv = {.window_start = now};
			ratelimit.update(&rk, &nv);
			rv = ratelimit.lookup(&rk);
		}
		if (rv) {
			if (now - rv->window_start > CW_RL_WINDOW_NS) {
				rv->window_start = now;
				rv->sent = 0;
			}
			if (rv->sent >= CW_RL_BURST) {
				__sync_fetch_and_add(&rv->suppressed, 1);
				stat_inc(CW_STAT_SUPPRESSED);
				hold(key.cgroup_id, cap, nr);
				return 0;
			}
		}
		/* A user other than root shares one budget over all its cgroups: a
		 * delegated subtree makes cgroups at will, each with a fresh budget. */
		u32 uid = (u32)bpf_get_current_uid_gid();
		if ((uid != 0 && !budget_take(CW_UID_BUDGET_KEY | uid, now)) ||
		    !budget_take(key.cgroup_id, now)) {
			if (rv)
				__sync_fetch_and_add(&rv->suppressed, 1);
			stat_inc(CW_STAT_SUPPRESSED);
			stat_inc(CW_STAT_BUDGET);
			hold(key.cgroup_id, cap, nr);
			return 0;
		}
		if (rv) {
			rv->sent++;
			suppressed = (u32)__sync_lock_test_and_set(&rv->suppressed, 0);
		}
	}

	char comm[CW_COMM_LEN] = {};
	bpf_get_current_comm(&comm, sizeof(comm));

#ifdef CW_UNIQUE
	struct cw_seen_key sk = {};
	sk.cgroup_id = key.cgroup_id;
	sk.cap = cap;
	sk.syscall_nr = nr;
	sk.denied = denied;
	__builtin_memcpy(sk.comm, comm, sizeof(comm));
	u8 one8 = 1;
	/* Allowed checks only: denials keep their own (rate-limited) path, so a
	 * unique stream still carries every denial (serve --profiles counts them). */
	/* A lookup first: a failed insert into an LRU hash still takes a node
	 * from its free list and the bucket lock (measured: +410 ns a check). */
	if (!denied && (seen.lookup(&sk) || seen.insert(&sk, &one8) != 0))
		return 0; /* seen before (or the table is full of newer tuples) */
#endif

	struct cw_event *e;
#if defined(CW_EMIT_ALL) || defined(CW_UNIQUE)
	if (!denied) {
		e = checks.ringbuf_reserve(sizeof(*e));
		if (!e) {
			stat_inc(CW_STAT_LOST_CHECKS);
			return 0;
		}
	} else
#endif
	{
		e = denials.ringbuf_reserve(sizeof(*e));
		if (!e) {
			stat_inc(CW_STAT_LOST_DENIALS);
			hold(key.cgroup_id, cap, nr);
			return 0;
		}
	}

	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = key.cgroup_id;
	e->pid = tgid;
	e->tid = (u32)pid_tgid;
	e->uid = (u32)bpf_get_current_uid_gid();
	e->cap = cap;
	e->syscall_nr = nr;
	e->ret = ret;
	u32 flags = opts_flags | (denied ? CW_F_DENIED : 0);
	u64 *init = initns.lookup(&zero);
	if (init && *init) {
		flags |= CW_F_USERNS_KNOWN;
		if (*init != ns)
			flags |= CW_F_USERNS;
	}
	e->flags = flags;
	e->suppressed = suppressed;
	__builtin_memcpy(e->comm, comm, sizeof(comm));

#if defined(CW_EMIT_ALL) || defined(CW_UNIQUE)
	if (!denied) {
		u64 *w = wake.lookup(&zero);
		u64 wflag = BPF_RB_NO_WAKEUP;
		if (w && ((*w)++ % CW_WAKE_EVERY) == 0)
			wflag = BPF_RB_FORCE_WAKEUP;
		checks.ringbuf_submit(e, wflag);
		return 0;
	}
#endif
#ifdef CW_OUTCOME
	if (nr >= 0) {
		u32 tid = (u32)pid_tgid;
		u32 one32 = 1;
		if (pending.insert(&tid, &one32) == 0) {
			u64 *g = pending_gate.lookup(&zero);
			if (g)
				__sync_fetch_and_add(g, 1);
		}
	}
#endif
	/* Denials: default wake-up (the kernel wakes the consumer when it has
	 * caught up), so a lone denial shows at once. */
	denials.ringbuf_submit(e, 0);
	return 0;
}

#ifdef CW_OUTCOME
static __always_inline int cw_is_send(s32 nr)
{
#if defined(__x86_64__) || defined(__TARGET_ARCH_x86)
	/* write, writev, sendto, sendmsg, sendmmsg */
	return nr == 1 || nr == 20 || nr == 44 || nr == 46 || nr == 307;
#elif defined(__aarch64__) || defined(__TARGET_ARCH_arm64)
	return nr == 64 || nr == 66 || nr == 206 || nr == 211 || nr == 269;
#else
	return 0;
#endif
}

static __always_inline int cw_sys_exit(s64 ret)
{
	u32 zero = 0;
	u64 *g = pending_gate.lookup(&zero);
	if (!g || *g == 0)
		return 0;
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tid = (u32)pid_tgid;
	if (pending.delete(&tid) != 0)
		return 0;
	__sync_fetch_and_add(g, -1);
	struct cw_event *e = denials.ringbuf_reserve(sizeof(*e));
	if (!e) {
		stat_inc(CW_STAT_LOST_OUTCOMES);
		return 0;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = pid_tgid >> 32;
	e->tid = tid;
	e->uid = (u32)bpf_get_current_uid_gid();
	e->cap = -1;
	e->syscall_nr = current_syscall();
	/* Errors are -4095..-1; a larger value (an mmap address, a 64-bit offset)
	 * is a success that does not fit the field: store INT_MAX. */
	e->ret = (ret < -4095 || ret > 0x7fffffff) ? 0x7fffffff : (s32)ret;
	e->flags = CW_F_OUTCOME;
	e->suppressed = 0;
	if (ret >= 0 && cw_is_send(e->syscall_nr)) {
		/* the fd it wrote to: only a netlink socket answers in a reply */
		struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
		struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
#if defined(__x86_64__) || defined(__TARGET_ARCH_x86)
		e->suppressed = (u32)regs->di;
		e->flags |= CW_F_FD;
#elif defined(__aarch64__) || defined(__TARGET_ARCH_arm64)
		e->suppressed = (u32)regs->orig_x0;
		e->flags |= CW_F_FD;
#endif
	}
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	denials.ringbuf_submit(e, 0);
	return 0;
}

/* ---- Refusals that the syscall's return does not tell (issue 13) ---- */

/* Asynchronous refusals: rtnetlink, genetlink and nfnetlink check
 * capabilities inside sendmsg() and put the -EPERM into the NLMSG_ERROR reply
 * that a later recvmsg() reads; sendmsg itself returns the byte count
 * (net/netlink/af_netlink.c netlink_rcv_skb -> netlink_ack, Linux 2.6.x to
 * 6.18). A process with a denial inside a send-family syscall that succeeded
 * is remembered here; the first NLMSG_ERROR message it then reads with
 * recvmsg/recvfrom is sent (CW_F_REPLY, with the reply's error), or, if it
 * reads none, its exit_group() status (CW_F_EXIT) when it exits. */
/* value: the sequence number of the first netlink message the denied request
 * sent, with bit 32 set when it could be read (else any reply is taken). */
BPF_TABLE("lru_hash", u32, u64, asyncwait, 4096);
/* How many processes asyncwait holds (an LRU eviction leaves it high: then
 * the recv check below costs a lookup more, never a wrong answer). Zero in
 * the common case, so a syscall exit pays one array read for replies. */
BPF_ARRAY(async_gate, u64, 1);

/* Where the user buffer of this thread's current send/recv syscall starts (its
 * first byte), read from the registers saved at syscall entry; 0 if unreadable.
 * write/sendto/recvfrom name the buffer, writev an iovec array, sendmsg,
 * sendmmsg and recvmsg a msghdr (sendmmsg's first) whose msg_iov is at
 * offset 16 (LP64). Still there at the syscall's exit. */
static __always_inline u64 cw_user_buffer(s32 nr)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	u64 arg = 0, iov = 0, buf = 0;
#if defined(__x86_64__) || defined(__TARGET_ARCH_x86)
	arg = regs->si;
	int via_iov = nr == 20, via_msg = nr == 46 || nr == 307 || nr == 47;
#elif defined(__aarch64__) || defined(__TARGET_ARCH_arm64)
	arg = regs->regs[1];
	int via_iov = nr == 66, via_msg = nr == 211 || nr == 269 || nr == 212;
#else
	int via_iov = 0, via_msg = 0;
#endif
	if (!via_msg && !via_iov)
		return arg;
	if (via_msg && bpf_probe_read_user(&iov, sizeof(iov), (const void *)(arg + 16)))
		return 0;
	if (via_iov)
		iov = arg;
	if (!iov || bpf_probe_read_user(&buf, sizeof(buf), (const void *)iov))
		return 0;
	return buf;
}

/* The nlmsg_seq of the first message a send-family syscall sent, with bit 32
 * set; 0 when unread. */
static __always_inline u64 cw_sent_seq(s32 nr)
{
	u64 buf = cw_user_buffer(nr);
	u32 seq = 0;
	if (!buf || bpf_probe_read_user(&seq, sizeof(seq), (const void *)(buf + 8)))
		return 0;
	return (1ULL << 32) | seq;
}

static __always_inline void cw_async_note(s64 ret)
{
	u32 zero = 0;
	if (ret < 0)
		return;
	u64 *g = pending_gate.lookup(&zero);
	if (!g || *g == 0)
		return;
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tid = (u32)pid_tgid;
	s32 nr = current_syscall();
	if (!pending.lookup(&tid) || !cw_is_send(nr))
		return;
	u32 tgid = pid_tgid >> 32;
	u64 seq = cw_sent_seq(nr);
	if (asyncwait.insert(&tgid, &seq) == 0) {
		u64 *ag = async_gate.lookup(&zero);
		if (ag)
			__sync_fetch_and_add(ag, 1);
	}
}

static __always_inline int cw_is_recv(s32 nr)
{
#if defined(__x86_64__) || defined(__TARGET_ARCH_x86)
	return nr == 45 || nr == 47; /* recvfrom, recvmsg */
#elif defined(__aarch64__) || defined(__TARGET_ARCH_arm64)
	return nr == 207 || nr == 212;
#else
	return 0;
#endif
}

/* struct nlmsghdr followed by struct nlmsgerr's error (uapi/linux/netlink.h). */
struct cw_nlerr {
	u32 len;
	u16 type;
	u16 flags;
	u32 seq;
	u32 port;
	s32 error;
};

/* A recv of a process that waits for a reply: if the first message it read
 * is an NLMSG_ERROR, send its error. The user buffer was just written by the
 * kernel (resident); recvmsg's first iovec is where the message starts. */
static __always_inline void cw_async_reply(s64 ret)
{
	u32 zero = 0;
	if (ret < (s64)sizeof(struct cw_nlerr))
		return;
	u64 *ag = async_gate.lookup(&zero);
	if (!ag || *ag == 0)
		return;
	s32 nr = current_syscall();
	if (!cw_is_recv(nr))
		return;
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tgid = pid_tgid >> 32;
	u64 *want = asyncwait.lookup(&tgid);
	if (!want)
		return;
	u64 wanted = *want;
	u64 buf = cw_user_buffer(nr);
	struct cw_nlerr m = {};
	if (!buf || bpf_probe_read_user(&m, sizeof(m), (const void *)buf))
		return;
	/* NLMSG_ERROR, a length that fits what was read, an errno or 0 */
	if (m.type != 2 || m.len < sizeof(m) || m.len > ret || m.error > 0 || m.error < -4095)
		return;
	/* the reply to another request (sent before, answered late): not this one's */
	if ((wanted >> 32) && m.seq != (u32)wanted)
		return;
	if (asyncwait.delete(&tgid) == 0)
		__sync_fetch_and_add(ag, -1);
	struct cw_event *e = denials.ringbuf_reserve(sizeof(*e));
	if (!e) {
		stat_inc(CW_STAT_LOST_OUTCOMES);
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = tgid;
	e->tid = (u32)pid_tgid;
	e->uid = (u32)bpf_get_current_uid_gid();
	e->cap = -1;
	e->syscall_nr = nr;
	e->ret = m.error;
	e->flags = CW_F_OUTCOME | CW_F_REPLY;
	e->suppressed = 0;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	denials.ringbuf_submit(e, 0);
}

/* syscalls:sys_enter_exit_group: runs once per exiting process, not per
 * syscall, so the common case costs one hash delete at process exit. */
TRACEPOINT_PROBE(syscalls, sys_enter_exit_group)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tgid = pid_tgid >> 32;
	if (asyncwait.delete(&tgid) != 0)
		return 0;
	u32 zero = 0;
	u64 *ag = async_gate.lookup(&zero);
	if (ag)
		__sync_fetch_and_add(ag, -1);
	struct cw_event *e = denials.ringbuf_reserve(sizeof(*e));
	if (!e) {
		stat_inc(CW_STAT_LOST_OUTCOMES);
		return 0;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = tgid;
	e->tid = (u32)pid_tgid;
	e->uid = (u32)bpf_get_current_uid_gid();
	e->cap = -1;
	e->syscall_nr = current_syscall();
	e->ret = (s32)(args->error_code & 0xff);
	e->flags = CW_F_OUTCOME | CW_F_EXIT;
	e->suppressed = 0;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	denials.ringbuf_submit(e, 0);
	return 0;
}

#ifdef CW_REFUSALS
/* For the watched target only (explain, advise): a syscall that ends in EPERM
 * or EACCES without a capability denial in it (seccomp, file capabilities
 * beyond the bounding set at execve, no_new_privs, an LSM, file modes). The
 * return value is compared first, so other syscalls pay one compare. */
#if !defined(CW_FILTER_CGROUP) && !defined(CW_FILTER_PID) && !defined(CW_REFUSAL_CGROUPS)
#error "CW_REFUSALS needs CW_FILTER_CGROUP, CW_FILTER_PID or CW_REFUSAL_CGROUPS"
#endif
#ifdef CW_REFUSAL_CGROUPS
/* Filled by user space before the target runs (LoadedProgram.set_refusal_cgroups). */
BPF_HASH(refusal_cgroups, u64, u8, CW_REFUSAL_CGROUPS_MAX);
#endif

/* Whether a refusal of cgroup ``cg`` is the target's (the pid filter aside). */
static __always_inline int cw_refusal_cgroup(u64 cg)
{
#ifdef CW_FILTER_CGROUP
	if (cg != CW_FILTER_CGROUP)
		return 0;
#endif
#if defined(CW_REFUSAL_CGROUPS) && CW_REFUSAL_CGROUPS == 1
	if (!refusal_cgroups.lookup(&cg))
		return 0;
#elif defined(CW_REFUSAL_CGROUPS) && CW_REFUSAL_CGROUPS == 2
	if (refusal_cgroups.lookup(&cg))
		return 0;
#endif
	return 1;
}
/* The path a refused execve/open-like syscall named, by thread: read from the
 * user registers saved at syscall entry (pt_regs is ABI), which a failed
 * syscall leaves as they were. Written before the refusal record is sent, so
 * user space finds it when the record arrives. */
struct cw_path {
	s32 nr; /* the syscall that named it: a later refusal must not take it */
	char p[256];
};
BPF_PERCPU_ARRAY(path_scratch, struct cw_path, 1);
BPF_TABLE("lru_hash", u32, struct cw_path, refusal_path, 1024);

static __always_inline void cw_note_path(u32 tid, s32 nr)
{
	u32 zero = 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	u64 arg = 0;
#if defined(__x86_64__) || defined(__TARGET_ARCH_x86)
	/* first argument: execve, open, creat, mkdir, unlink, truncate, chmod;
	 * second (after a dirfd): execveat, openat, mkdirat, unlinkat, fchmodat, openat2 */
	if (nr == 59 || nr == 2 || nr == 85 || nr == 83 || nr == 87 || nr == 76 || nr == 90)
		arg = regs->di;
	else if (nr == 322 || nr == 257 || nr == 258 || nr == 263 || nr == 268 || nr == 437)
		arg = regs->si;
#elif defined(__aarch64__) || defined(__TARGET_ARCH_arm64)
	if (nr == 221 || nr == 45) /* execve, truncate */
		arg = regs->regs[0];
	else if (nr == 281 || nr == 56 || nr == 34 || nr == 35 || nr == 53 || nr == 437)
		arg = regs->regs[1];
#endif
	if (!arg)
		return;
	struct cw_path *buf = path_scratch.lookup(&zero);
	if (!buf)
		return;
	if (bpf_probe_read_user_str(buf->p, sizeof(buf->p), (const void *)arg) <= 0)
		return;
	buf->nr = nr;
	refusal_path.update(&tid, buf);
}

/* An exec's path is also kept at its entry, for the watched target only: by
 * sys_exit a multi-threaded caller (runc's Go init) may have let the page
 * holding the string go, and BPF cannot fault it back in. */
static __always_inline void cw_exec_enter(const char *filename)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
#ifdef CW_FILTER_PID
	if ((pid_tgid >> 32) != CW_FILTER_PID)
		return;
#endif
	if (!cw_refusal_cgroup(bpf_get_current_cgroup_id()))
		return;
	u32 zero = 0, tid = (u32)pid_tgid;
	struct cw_path *buf = path_scratch.lookup(&zero);
	if (!buf || bpf_probe_read_user_str(buf->p, sizeof(buf->p), filename) <= 0)
		return;
	buf->nr = current_syscall();
	refusal_path.update(&tid, buf);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
	cw_exec_enter(args->filename);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
	cw_exec_enter(args->filename);
	return 0;
}

static __always_inline int cw_is_exec(s32 nr)
{
#if defined(__x86_64__) || defined(__TARGET_ARCH_x86)
	return nr == 59 || nr == 322;
#elif defined(__aarch64__) || defined(__TARGET_ARCH_arm64)
	return nr == 221 || nr == 281;
#else
	return 0;
#endif
}

#ifdef CW_REFUSAL_ENTRY
/* The syscall each thread of the target last entered: a refused syscall that
 * never entered was refused at entry (seccomp), before it could run. Only the
 * target's threads pay the update; every syscall of the node pays the hook
 * while it is loaded (explain only: docs/benchmarks.md). */
BPF_TABLE("lru_hash", u32, s32, entered, 10240);

RAW_TRACEPOINT_PROBE(sys_enter)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
#ifdef CW_FILTER_PID
	if ((pid_tgid >> 32) != CW_FILTER_PID)
		return 0;
#endif
	if (!cw_refusal_cgroup(bpf_get_current_cgroup_id()))
		return 0;
	u32 tid = (u32)pid_tgid;
	s32 nr = (s32)ctx->args[1];
	entered.update(&tid, &nr);
	return 0;
}
#endif

static __always_inline void cw_refusal(s64 ret)
{
	if (ret != -1 && ret != -13) /* -EPERM, -EACCES */
		return;
	u64 pid_tgid = bpf_get_current_pid_tgid();
#ifdef CW_FILTER_PID
	if ((pid_tgid >> 32) != CW_FILTER_PID)
		return;
#endif
	u64 cg = bpf_get_current_cgroup_id();
	if (!cw_refusal_cgroup(cg))
		return;
	u32 tid = (u32)pid_tgid;
	s32 nr = current_syscall();
	/* A denial in it: its outcome record follows. Except for execve, whose
	 * CAP_SYS_ADMIN check in memory accounting is no reason for an EPERM that
	 * file capabilities caused: the refusal is sent too, with its path. */
	if (!cw_is_exec(nr) && pending.lookup(&tid))
		return;
	struct cw_event *e = denials.ringbuf_reserve(sizeof(*e));
	if (!e) {
		stat_inc(CW_STAT_LOST_OUTCOMES);
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = cg;
	e->pid = pid_tgid >> 32;
	e->tid = tid;
	e->uid = (u32)bpf_get_current_uid_gid();
	e->cap = -1;
	e->syscall_nr = nr;
	cw_note_path(tid, nr);
	e->ret = (s32)ret;
	e->flags = CW_F_OUTCOME | CW_F_REFUSAL;
#ifdef CW_REFUSAL_ENTRY
	s32 *in = entered.lookup(&tid);
	if (in && *in == nr)
		e->flags |= CW_F_ENTERED | CW_F_ENTRY_KNOWN;
	else
		e->flags |= CW_F_ENTRY_KNOWN;
#endif
	e->suppressed = 0;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	denials.ringbuf_submit(e, 0);
}
#endif
/* ---- end of issue 13's block ---- */

/* raw_syscalls:sys_exit (args: regs, ret). A raw tracepoint costs less than
 * the regular one; both exist since Linux 4.17 / 2.6.x. */
RAW_TRACEPOINT_PROBE(sys_exit)
{
#ifdef CW_REFUSALS
	cw_refusal((s64)ctx->args[1]);
#endif
	cw_async_note((s64)ctx->args[1]);
	cw_async_reply((s64)ctx->args[1]);
	return cw_sys_exit((s64)ctx->args[1]);
}
#endif

static __always_inline u32 opts_to_flags(u32 opts)
{
	u32 f = CW_F_OPTS_KNOWN;
#ifdef CAP_OPT_NOAUDIT
	/* cap_capable(cred, ns, cap, unsigned int opts): Linux 5.1, commit
	 * c1a85a00ea66 (backported to 4.19.98 and RHEL 8's 4.18). */
	if (opts & CAP_OPT_NOAUDIT)
		f |= CW_F_NOAUDIT;
	if (opts & CAP_OPT_INSETID)
		f |= CW_F_INSETID;
#else
	/* Before: cap_capable(cred, ns, cap, int audit), SECURITY_CAP_NOAUDIT == 0. */
	if (opts == 0)
		f |= CW_F_NOAUDIT;
#endif
	return f;
}

#if defined(CW_ATTACH_RAW_TP)
/* Raw tracepoint cap_capable: Linux 6.14, commit d48da4d5ed7b.
 * args: cred, target_ns, capable_ns, cap, ret. No opts. */
#ifdef CW_NO_AUTOATTACH
int cw_raw_tp(struct bpf_raw_tracepoint_args *ctx)
#else
RAW_TRACEPOINT_PROBE(cap_capable)
#endif
{
	return cw_handle(ctx, (s32)ctx->args[3], (s32)ctx->args[4], ctx->args[1], 0);
}

#elif defined(CW_ATTACH_TP)
#ifdef CW_NO_AUTOATTACH
#error "the regular tracepoint is verified through BCC's attach only"
#endif
TRACEPOINT_PROBE(capability, cap_capable)
{
	return cw_handle(args, args->cap, args->ret, (u64)args->target_ns, 0);
}

#elif defined(CW_ATTACH_FEXIT)
/* fexit sees the arguments and the return value, opts included. */
KRETFUNC_PROBE(cap_capable, const struct cred *cred, struct user_namespace *targ_ns, int cap,
	       unsigned int opts, int ret)
{
	return cw_handle(ctx, cap, ret, (u64)targ_ns, opts_to_flags(opts));
}

#elif defined(CW_ATTACH_KPROBE)
/* kprobe + kretprobe: the entry stashes the arguments by thread. */
struct cw_args {
	u64 ns;
	s32 cap;
	u32 opts;
};
/* LRU: a thread whose kretprobe never fires (killed mid-check, kretprobe
 * maxactive exhausted) must not pin a slot forever; a return that finds no
 * entry (evicted, or the entry probe missed) is counted, not silently lost. */
BPF_TABLE("lru_hash", u32, struct cw_args, inflight, 10240);

#ifdef CW_NO_AUTOATTACH
int cw_kprobe(struct pt_regs *ctx)
#else
int kprobe__cap_capable(struct pt_regs *ctx)
#endif
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct cw_args a = {};
	a.ns = PT_REGS_PARM2(ctx);
	a.cap = (s32)PT_REGS_PARM3(ctx);
	a.opts = (u32)PT_REGS_PARM4(ctx);
	inflight.update(&tid, &a);
	return 0;
}

#ifdef CW_NO_AUTOATTACH
int cw_kretprobe(struct pt_regs *ctx)
#else
int kretprobe__cap_capable(struct pt_regs *ctx)
#endif
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct cw_args *a = inflight.lookup(&tid);
	if (!a) {
		stat_inc(CW_STAT_KPROBE_UNPAIRED);
		return 0;
	}
	struct cw_args copy = *a;
	inflight.delete(&tid);
	return cw_handle(ctx, copy.cap, (s32)PT_REGS_RC(ctx), copy.ns, opts_to_flags(copy.opts));
}
#else
#error "define one of CW_ATTACH_RAW_TP, CW_ATTACH_TP, CW_ATTACH_FEXIT, CW_ATTACH_KPROBE"
#endif
