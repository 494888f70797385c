#ifndef FARMGATE_CGPIOD_SHIM_H
#define FARMGATE_CGPIOD_SHIM_H
// libgpiod 1.6 (the v1 API) from Debian 12's libgpiod-dev (pkg-config name libgpiod). Only
// Sources/FarmgateAgent/Drivers/GPIO/LibgpiodBackend.swift imports it, so that the 2.x API can replace it there.
#include <gpiod.h>
#endif
