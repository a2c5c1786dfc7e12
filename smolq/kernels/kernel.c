/* Placeholder until the kernel lands: keeps the build green. */
#include "smolq_kernel.h"
int smolq_kernel_abi_version(void) { return 1; }
