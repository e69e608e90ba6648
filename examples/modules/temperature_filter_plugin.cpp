#include "temperature_filter.hpp"

CANOPY_MODULE(canopy::examples::temperature_filter)
