#include "simulated_temperature_sensor.hpp"

CANOPY_MODULE(canopy::examples::simulated_temperature_sensor)
