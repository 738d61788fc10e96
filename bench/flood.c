/* An adversarial capability-check flood: allowed CAP_SETUID checks and
 * denied CAP_SYS_TIME checks (run it without CAP_SYS_TIME), at full speed,
 * for SECONDS seconds. Prints how many of each it made.
 *   cc -O2 -o flood flood.c && capsh --drop=cap_sys_time -- -c './flood 60' */
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	double seconds = argc > 1 ? atof(argv[1]) : 10;
	struct timespec t0, t;
	unsigned long allowed = 0, denied = 0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		for (int i = 0; i < 1000; i++) {
			if (setuid(0) == 0)
				allowed++;
			/* the raw syscall: glibc's settimeofday(NULL, NULL) skips the kernel */
			if (syscall(SYS_settimeofday, NULL, NULL) != 0)
				denied++;
		}
		clock_gettime(CLOCK_MONOTONIC, &t);
		if ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 >= seconds)
			break;
	}
	printf("%lu %lu\n", allowed, denied);
	return 0;
}
