#ifndef FARMGATE_CLINUX_SHIM_H
#define FARMGATE_CLINUX_SHIM_H
// Linux interfaces that Glibc's Swift module does not export.
#include <sys/timex.h>
#include <sys/un.h>
#include <sys/socket.h>

/// adjtimex(2) returns TIME_ERROR while the kernel's clock is not synchronised (no NTP sync yet).
static inline int fg_clock_is_synchronized(void) {
    struct timex status = {0};
    int state = adjtimex(&status);
    return state >= 0 && state != TIME_ERROR;
}
#endif
