#ifndef FARMGATE_CMODBUS_SHIM_H
#define FARMGATE_CMODBUS_SHIM_H
// libmodbus 3.1 from Debian's libmodbus-dev (pkg-config name libmodbus). Used by the agent's Modbus RTU driver and by
// the tests' Modbus slave.
#include <modbus/modbus.h>
#endif
