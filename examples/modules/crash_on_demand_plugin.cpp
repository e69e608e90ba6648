#include "crash_on_demand.hpp"

CANOPY_MODULE(canopy::examples::crash_on_demand)
