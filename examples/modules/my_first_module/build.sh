#!/bin/sh
# Builds libmy_first_module.so out of the Canopy tree: all a module needs is the
# SDK headers (actors/include) and libcanopy-sdk.so, plus spdlog and
# nlohmann-json (Debian: libspdlog-dev, nlohmann-json3-dev).
#
#   CANOPY        Canopy's source tree   (default: ../../.. from this script)
#   CANOPY_BUILD  its build directory    (default: $CANOPY/build)
#   CXX           the compiler           (default: g++)
set -eu
cd "$(dirname "$0")"
CANOPY=${CANOPY:-../../..}
CANOPY_BUILD=${CANOPY_BUILD:-$CANOPY/build}

# -fvisibility=hidden: export only canopy_module_entry (CANOPY_MODULE marks it).
# -Wl,--no-undefined: report a missing symbol now, not when the node loads it.
# shellcheck disable=SC2046  # pkg-config output is meant to split into words
${CXX:-g++} -std=c++20 -O2 -Wall -Wextra -shared -fPIC -fvisibility=hidden \
  -I"$CANOPY/actors/include" \
  my_first_module.cpp -o libmy_first_module.so \
  -L"$CANOPY_BUILD" -lcanopy-sdk -Wl,--no-undefined \
  $(pkg-config --cflags --libs spdlog nlohmann_json)
echo "built $(pwd)/libmy_first_module.so"
