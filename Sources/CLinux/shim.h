#ifndef FARMGATE_CLINUX_SHIM_H
#define FARMGATE_CLINUX_SHIM_H
// Linux interfaces that Glibc's Swift module does not export.
#include <sys/timex.h>
#include <sys/un.h>
#include <sys/socket.h>
#include <time.h>
#include <sys/prctl.h>
#include <sys/epoll.h>

/// adjtimex(2) returns TIME_ERROR while the kernel's clock is not synchronised (no NTP sync yet).
static inline int fg_clock_is_synchronized(void) {
    struct timex status = {0};
    int state = adjtimex(&status);
    return state >= 0 && state != TIME_ERROR;
}

/// CLOCK_REALTIME and CLOCK_BOOTTIME read back to back, in microseconds. CLOCK_BOOTTIME is monotonic, is never set
/// by NTP or by hand, and keeps counting through suspend: a reading's boot time plus (realtime - boottime) measured
/// once the clock is synchronised is its true time. Returns 0 on success, -1 if either clock cannot be read.
static inline int fg_clock_pair_microseconds(long long *realtime, long long *boottime) {
    struct timespec real, boot;
    if (clock_gettime(CLOCK_REALTIME, &real) != 0) return -1;
    if (clock_gettime(CLOCK_BOOTTIME, &boot) != 0) return -1;
    *realtime = (long long)real.tv_sec * 1000000LL + real.tv_nsec / 1000;
    *boottime = (long long)boot.tv_sec * 1000000LL + boot.tv_nsec / 1000;
    return 0;
}
/// Names the calling thread (at most 15 bytes are kept) as `top -H` and /proc/PID/task/*/comm show it.
/// prctl(2) is variadic, which Swift cannot call.
static inline int fg_set_thread_name(const char *name) {
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0);
}
#endif
