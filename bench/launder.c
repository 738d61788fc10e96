/* Laundering attempt (issue 12): a non-root process floods writable private
 * mmaps (one CAP_SYS_ADMIN check each in cap_vm_enough_memory, denied; the
 * default policy calls them expected) and tries mount(2) (CAP_SYS_ADMIN,
 * denied for real) every INTERVAL seconds, for SECONDS seconds.
 * Prints "mmaps mounts".
 *   cc -O2 -o launder launder.c && setpriv --reuid=65534 --regid=65534
 * --clear-groups ./launder 10 0.25 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  double seconds = argc > 1 ? atof(argv[1]) : 10,
         every = argc > 2 ? atof(argv[2]) : 0.25;
  unsigned long maps = 0, mounts = 0;
  double t0 = now(), next = t0 + every;
  while (now() - t0 < seconds) {
    for (int i = 0; i < 1000; i++) {
      void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p != MAP_FAILED) {
        munmap(p, 4096);
        maps++;
      }
    }
    if (now() >= next) {
      if (mount("none", "/mnt", "tmpfs", 0, NULL) == 0 || errno != EPERM)
        return 2;
      mounts++;
      next += every;
    }
  }
  printf("%lu %lu\n", maps, mounts);
  return 0;
}
