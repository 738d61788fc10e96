/* A denial flooder (issue 12): eight kinds of (capability, syscall) denial, for
 * a non-root user, at full speed for SECONDS seconds. Prints how many failed.
 *   cc -O2 -o denyflood denyflood.c && setpriv --reuid=65534 --regid=65534
 * --clear-groups ./denyflood 5 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 5;
  struct timespec t0, t;
  unsigned long n = 0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (;;) {
    for (int i = 0; i < 100; i++) {
      n += syscall(SYS_settimeofday, NULL, NULL) != 0; /* CAP_SYS_TIME */
      n += setuid(0) != 0;                             /* CAP_SETUID */
      n += setgid(0) != 0;                             /* CAP_SETGID */
      n += sethostname("x", 1) != 0;                   /* CAP_SYS_ADMIN */
      n += chroot("/") != 0;                           /* CAP_SYS_CHROOT */
      n += setpriority(PRIO_PROCESS, 0, -5) != 0;      /* CAP_SYS_NICE */
      n += acct(NULL) != 0;                            /* CAP_SYS_PACCT */
      n +=
          mknod("/tmp/capwatch-flood-mknod", S_IFCHR, 259) != 0; /* CAP_MKNOD */
    }
    clock_gettime(CLOCK_MONOTONIC, &t);
    if ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 >= seconds)
      break;
  }
  printf("%lu\n", n);
  return 0;
}
