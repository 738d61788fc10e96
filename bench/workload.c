// SPDX-License-Identifier: Apache-2.0
/* The benchmark's workload: capability checks at full speed, or a trickle of
 * denials. Compiled at run time by bench/bench_overhead.py with the host's cc.
 *
 *   workload flood N settime|setuid CPU [CGROUP_PROCS]
 *       N calls of settimeofday(NULL, NULL) (one CAP_SYS_TIME check each, and
 *       allowed for root: with both pointers NULL nothing is changed) or
 *       setuid(0) (one CAP_SETUID check), pinned to CPU, after joining the
 *       cgroup v2 directory whose cgroup.procs file is given. Prints
 *       "calls=N ns=T cpu_ns=C t0=S t1=E": T the CLOCK_MONOTONIC time of the
 *       loop, C this thread's CPU time in it (T - C: time other tasks took
 *       from the CPU), S and E its CLOCK_MONOTONIC start and end.
 *   workload trickle INTERVAL_MS CPU
 *       Drops CAP_SYS_TIME (effective and permitted), then every INTERVAL_MS
 *       calls settimeofday() with the current time: denied (EPERM). Stops on
 *       SIGTERM or SIGINT; prints "denied=D other=O" (O: calls that did not
 *       fail with EPERM, expected 0).
 *
 * The raw syscall is used: glibc's settimeofday(NULL, NULL) may dereference
 * the NULL timeval instead of entering the kernel.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define CAP_SYS_TIME_BIT 25

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static void pin(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0) {
		perror("sched_setaffinity");
		exit(2);
	}
}

static void join_cgroup(const char *procs)
{
	FILE *f = fopen(procs, "w");
	if (!f || fprintf(f, "0\n") < 0 || fclose(f) != 0) {
		perror(procs);
		exit(2);
	}
}

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int flood(long n, const char *kind, int cpu, const char *procs)
{
	int setuid_kind = strcmp(kind, "setuid") == 0;
	if (!setuid_kind && strcmp(kind, "settime") != 0) {
		fprintf(stderr, "unknown kind %s\n", kind);
		return 2;
	}
	pin(cpu);
	if (procs)
		join_cgroup(procs);
	struct timespec c0, c1;
	long long t0 = now_ns();
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
	for (long i = 0; i < n; i++) {
		if (setuid_kind)
			syscall(SYS_setuid, 0);
		else
			syscall(SYS_settimeofday, NULL, NULL);
	}
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
	long long t1 = now_ns();
	long long cpu_ns = (c1.tv_sec - c0.tv_sec) * 1000000000LL + (c1.tv_nsec - c0.tv_nsec);
	printf("calls=%ld ns=%lld cpu_ns=%lld t0=%lld t1=%lld\n", n, t1 - t0, cpu_ns, t0, t1);
	return 0;
}

static int drop_sys_time(void)
{
	struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
	struct __user_cap_data_struct data[2];
	if (syscall(SYS_capget, &hdr, data) != 0)
		return -1;
	data[0].effective &= ~(1u << CAP_SYS_TIME_BIT);
	data[0].permitted &= ~(1u << CAP_SYS_TIME_BIT);
	data[0].inheritable &= ~(1u << CAP_SYS_TIME_BIT);
	return (int)syscall(SYS_capset, &hdr, data);
}

static int trickle(long interval_ms, int cpu)
{
	pin(cpu);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal; /* no SA_RESTART: nanosleep returns at once */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	if (drop_sys_time() != 0) {
		perror("capset");
		return 2;
	}
	printf("ready\n");
	fflush(stdout);
	long denied = 0, other = 0;
	struct timespec gap = {.tv_sec = interval_ms / 1000, .tv_nsec = (interval_ms % 1000) * 1000000L};
	while (!stop) {
		struct timeval tv;
		gettimeofday(&tv, NULL);
		if (syscall(SYS_settimeofday, &tv, NULL) != 0 && errno == EPERM)
			denied++;
		else
			other++;
		nanosleep(&gap, NULL);
	}
	printf("denied=%ld other=%ld\n", denied, other);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 5 && strcmp(argv[1], "flood") == 0)
		return flood(atol(argv[2]), argv[3], atoi(argv[4]), argc > 5 ? argv[5] : NULL);
	if (argc == 4 && strcmp(argv[1], "trickle") == 0)
		return trickle(atol(argv[2]), atoi(argv[3]));
	fprintf(stderr, "usage: %s flood N settime|setuid CPU [CGROUP_PROCS]\n"
			"       %s trickle INTERVAL_MS CPU\n",
		argv[0], argv[0]);
	return 2;
}
