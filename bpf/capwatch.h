/* SPDX-License-Identifier: Apache-2.0 */
/* The one definition of what crosses from kernel to user space.
 * Mirrored in capwatch/events.py; tests/unit/test_events.py checks that the
 * two agree on size and offsets (by compiling this header with the host cc). */
#ifndef CAPWATCH_H
#define CAPWATCH_H

#define CW_COMM_LEN 16

/* cw_event.flags */
#define CW_F_DENIED 0x01       /* cap_capable returned non-zero */
#define CW_F_NOAUDIT 0x02      /* opts & CAP_OPT_NOAUDIT (fexit/kprobe only) */
#define CW_F_INSETID 0x04      /* opts & CAP_OPT_INSETID (fexit/kprobe only) */
#define CW_F_OPTS_KNOWN 0x08   /* the hook exposes opts: the two bits above mean something */
#define CW_F_USERNS 0x10       /* the target (resource's) user namespace is not the initial one */
#define CW_F_USERNS_KNOWN 0x20 /* the initial namespace was known when this was recorded */
/* Not a check: the return value (ret) of the syscall in which this thread's
 * preceding denials happened (--outcome). */
#define CW_F_OUTCOME 0x40
/* Refusal records (issue 13), sent with CW_F_OUTCOME set so that a consumer
 * that ignores outcome records ignores these too:
 *   CW_F_EXIT     ret is the exit_group() status of a process that earlier had
 *                 a denial inside a send-family syscall that succeeded (netlink
 *                 reports its errors in the reply, not in sendmsg's return).
 *   CW_F_REFUSAL  a syscall of the watched target ended in EPERM or EACCES
 *                 with no capability denied in it (CW_REFUSALS); ret is its
 *                 return value. */
#define CW_F_EXIT 0x100
#define CW_F_REFUSAL 0x200
/*   CW_F_REPLY    ret is the error of the NLMSG_ERROR reply that such a process
 *                 read next (recvmsg/recvfrom): -EPERM, another -errno, or 0
 *                 (the request was acknowledged). Sent instead of CW_F_EXIT. */
#define CW_F_REPLY 0x400
/*   CW_F_FD       on an outcome record of a send-family syscall that succeeded:
 *                 ``suppressed`` holds the file descriptor it wrote to, so that
 *                 user space can tell a netlink socket from a file or a pipe. */
#define CW_F_FD 0x800
/*   CW_F_ENTERED  on a refusal record: raw_syscalls:sys_enter saw this thread
 *                 enter this syscall. Its absence means the syscall never ran:
 *                 a seccomp filter (or a ptrace tracer) refused it at entry,
 *                 before the sys_enter tracepoint (kernel/entry/common.c). */
#define CW_F_ENTERED 0x1000
/*   CW_F_ENTRY_KNOWN  on a refusal record: entries were watched (CW_REFUSAL_ENTRY),
 *                 so CW_F_ENTERED's absence means "not entered", not "not known". */
#define CW_F_ENTRY_KNOWN 0x2000

struct cw_event {
	__u64 ts_ns;	 /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cgroup_id; /* cgroup v2 id: inode of the cgroup directory */
	__u32 pid;	 /* thread group id */
	__u32 tid;
	__u32 uid; /* real uid, from bpf_get_current_uid_gid() */
	__s32 cap;
	__s32 syscall_nr; /* syscall the task is in, -1 if unknown */
	__s32 ret;	  /* cap_capable's return: 0 or -EPERM */
	__u32 flags;	  /* CW_F_* */
	/* Denials of this (cgroup, pid, cap, syscall) held back since the last one sent:
	 * informational (the log's "+N"); the exact count of held denials, by
	 * syscall, is the held map (struct cw_held_key), never this field. */
	__u32 suppressed;
	char comm[CW_COMM_LEN];
};

/* Key of the exact in-kernel count map. */
struct cw_count_key {
	__u64 cgroup_id;
	__s32 cap;
	__u32 denied;
};

/* Key of the held map: denials not sent to the ring (held back by a rate
 * limit or the per-cgroup budget, or the ring was full), counted exactly by
 * (cgroup, cap, syscall) so that user space classifies each with its own
 * syscall (capwatch/held.py). */
struct cw_held_key {
	__u64 cgroup_id;
	__s32 cap;
	__s32 syscall_nr;
};

/* The per-CPU count cache in front of the count map (see capwatch.bpf.c).
 * seq_head is first in memory and seq_tail last: a map lookup copies a CPU's
 * value in ascending address order, so head != tail means a flush overlapped
 * the copy. n[] is flat ([cap * 2 + denied]): bcc 0.26 sizes 2-D arrays in map
 * values at half their size. */
#define CW_NCAP 64
/* The slot of n[] that counts (cap, denied), cap < CW_NCAP; the user-space
 * reader decodes slot i as cap = i >> 1, denied = i & 1 (capwatch.kernel.bpf). */
#define CW_CACHE_SLOT(cap, denied) (((cap) & (CW_NCAP - 1)) * 2 + ((denied)&1))
struct cw_cache {
	__u64 seq_head;
	__u64 cgroup_id;
	__u64 n[CW_NCAP * 2];
	__u64 seq_tail;
};

/* Indexes of the per-CPU stats array. */
#define CW_STAT_LOST_DENIALS 0	/* denial ring full: reserve failed */
#define CW_STAT_LOST_CHECKS 1	/* checks ring full (--all/--unique): reserve failed */
#define CW_STAT_SUPPRESSED 2	/* denials held back by a rate limit or the cgroup budget */
#define CW_STAT_COUNT_FAIL 3	/* count map full: a check could not be counted */
#define CW_STAT_OWN_CHECKS 4	/* capwatch's own checks on the streaming path (not sent) */
#define CW_STAT_LOST_OUTCOMES 5 /* denial ring full when a syscall's outcome was to be sent */
#define CW_STAT_COUNT_NEW 6 /* entries made in the count map (evicted = made - live - deleted) */
#define CW_STAT_HELD_NEW 7  /* entries made in the held map */
#define CW_STAT_HELD_FAIL 8 /* a held denial the held map could not count */
#define CW_STAT_BUDGET 9    /* of SUPPRESSED: held back by the per-cgroup budget */
#define CW_STAT_KPROBE_UNPAIRED 10 /* kprobe: a return without its entry (not counted) */
#define CW_STAT_NR 16

#endif
