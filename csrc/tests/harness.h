// A tiny self-contained test harness for the C++ unit tests (no GoogleTest needed).
//
// Cases are named "group/rest"; `robustft_cpp_tests GROUP...` runs the cases of the
// given groups, a bare run executes every case, `--list` prints them. A case fails when
// any RFT_CHECK fails or it throws; the process exits nonzero when a case failed or the
// selection matched no case.
#pragma once

#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace rft_test {

struct Case {
  std::string name;
  std::function<void()> fn;
};

std::vector<Case>& registry();
void add_case(std::string name, std::function<void()> fn);

// Records a failure of the running case (the case continues).
void fail(const char* file, int line, const std::string& message);
// Attaches an informational note (e.g. measured errors) to the running case's report.
void note(const std::string& text);

// Registers cases at static-initialisation time: RFT_CASES(id) { add_case(...); ... }
struct Registrar {
  explicit Registrar(void (*fn)()) { fn(); }
};

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  os.precision(17);
  (os << ... << args);
  return os.str();
}

}  // namespace rft_test

#define RFT_CONCAT_(a, b) a##b
#define RFT_CONCAT(a, b) RFT_CONCAT_(a, b)

// A single named case.
#define RFT_TEST(NAME, ID)                                                          \
  static void RFT_CONCAT(rft_case_, ID)();                                          \
  static ::rft_test::Registrar RFT_CONCAT(rft_reg_, ID)(                             \
      [] { ::rft_test::add_case(NAME, &RFT_CONCAT(rft_case_, ID)); });               \
  static void RFT_CONCAT(rft_case_, ID)()

// A block that registers any number of (parameterised) cases with add_case.
#define RFT_CASES(ID)                                                               \
  static void RFT_CONCAT(rft_cases_, ID)();                                         \
  static ::rft_test::Registrar RFT_CONCAT(rft_creg_, ID)(&RFT_CONCAT(rft_cases_, ID)); \
  static void RFT_CONCAT(rft_cases_, ID)()

#define RFT_CHECK(cond)                                                             \
  do {                                                                              \
    if (!(cond)) ::rft_test::fail(__FILE__, __LINE__, "check failed: " #cond);      \
  } while (0)

#define RFT_CHECK_MSG(cond, ...)                                                    \
  do {                                                                              \
    if (!(cond))                                                                    \
      ::rft_test::fail(__FILE__, __LINE__,                                          \
                       ::rft_test::cat("check failed: " #cond ": ", __VA_ARGS__));  \
  } while (0)

// Expects `stmt` to throw an exception of type EXC.
#define RFT_CHECK_THROWS(EXC, stmt)                                                 \
  do {                                                                              \
    bool rft_threw_ = false;                                                        \
    try {                                                                           \
      stmt;                                                                         \
    } catch (const EXC&) {                                                          \
      rft_threw_ = true;                                                            \
    }                                                                               \
    if (!rft_threw_)                                                                \
      ::rft_test::fail(__FILE__, __LINE__, "expected " #EXC " from: " #stmt);       \
  } while (0)
