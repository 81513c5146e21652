// The one assertion macro the plain C++ test drivers share: counts checks and failures, never aborts,
// so a sanitizer run reports every failing case in one go.
#pragma once
#include <cstdio>

namespace lora_fast_test {
inline int g_failures = 0;
inline int g_checks = 0;
}  // namespace lora_fast_test

#define CHECK(cond)                                                                       \
    do {                                                                                  \
        ++lora_fast_test::g_checks;                                                       \
        if (!(cond)) {                                                                    \
            ++lora_fast_test::g_failures;                                                 \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                                 \
    } while (0)
