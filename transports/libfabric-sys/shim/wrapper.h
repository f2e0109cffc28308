/* Headers bound by libfabric-sys (included by shim.h), plus the prototypes
 * of the C shim. */
#include "shim.h"
