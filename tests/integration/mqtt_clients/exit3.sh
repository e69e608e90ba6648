#!/bin/sh
# A process module that crashes at once with exit code 3: the crash-looping
# module of tests/integration/mqtt.test.cpp.
echo "crashing on purpose (exit 3)" >&2
exit 3
