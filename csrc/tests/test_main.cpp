// Runner of the C++ unit tests: see harness.h for the command line.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "harness.h"

namespace rft_test {
namespace {

struct Running {
  std::vector<std::string> failures;
  std::vector<std::string> notes;
};
Running* g_running = nullptr;

std::string group_of(const std::string& name) { return name.substr(0, name.find('/')); }

std::vector<std::string> split_csv(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = s.find(',', start);
    const std::string item = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!item.empty()) out.push_back(item);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

}  // namespace

std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

void add_case(std::string name, std::function<void()> fn) {
  registry().push_back(Case{std::move(name), std::move(fn)});
}

void fail(const char* file, int line, const std::string& message) {
  const std::string text = cat(file, ":", line, ": ", message);
  if (g_running == nullptr) {
    std::cerr << "failure outside a test case: " << text << "\n";
    std::exit(2);
  }
  g_running->failures.push_back(text);
}

void note(const std::string& text) {
  if (g_running != nullptr) g_running->notes.push_back(text);
}

}  // namespace rft_test

int main(int argc, char** argv) {
  using namespace rft_test;
  std::vector<std::string> groups;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--list") {
      for (const auto& c : registry()) std::cout << c.name << "\n";
      return 0;
    }
    if (arg == "--groups-cover") {
      // Every case must belong to one of the comma-separated groups (ctest entries).
      if (i + 1 >= argc) {
        std::cerr << "--groups-cover needs a comma-separated list\n";
        return 2;
      }
      const auto list = split_csv(argv[i + 1]);
      const std::set<std::string> known(list.begin(), list.end());
      int missing = 0;
      for (const auto& c : registry()) {
        if (!known.count(group_of(c.name))) {
          std::cerr << "case not run by any ctest entry: " << c.name << "\n";
          ++missing;
        }
      }
      std::cout << registry().size() << " cases, " << missing << " outside the groups\n";
      return missing == 0 && !registry().empty() ? 0 : 1;
    }
    if (arg == "-h" || arg == "--help") {
      std::cout << "usage: " << argv[0] << " [--list | --groups-cover g1,g2,... | GROUP...]\n";
      return 0;
    }
    groups.push_back(arg);
  }
  const std::set<std::string> wanted(groups.begin(), groups.end());

  int run = 0, failed = 0;
  std::vector<std::string> failed_names;
  const auto t_all = std::chrono::steady_clock::now();
  for (const auto& c : registry()) {
    if (!wanted.empty() && !wanted.count(group_of(c.name))) continue;
    ++run;
    Running r;
    g_running = &r;
    std::cout << "[ RUN      ] " << c.name << std::endl;
    const auto t0 = std::chrono::steady_clock::now();
    try {
      c.fn();
    } catch (const std::exception& e) {
      r.failures.push_back(cat("uncaught exception: ", e.what()));
    } catch (...) {
      r.failures.push_back("uncaught non-std exception");
    }
    g_running = nullptr;
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    for (const auto& n : r.notes) std::cout << "             " << n << "\n";
    for (const auto& f : r.failures) std::cout << "  FAILURE: " << f << "\n";
    char buf[64];
    std::snprintf(buf, sizeof(buf), " (%.1f ms)", ms);
    if (r.failures.empty()) {
      std::cout << "[       OK ] " << c.name << buf << std::endl;
    } else {
      ++failed;
      failed_names.push_back(c.name);
      std::cout << "[  FAILED  ] " << c.name << buf << std::endl;
    }
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_all).count();
  std::cout << "==== " << run << " cases, " << (run - failed) << " passed, " << failed
            << " failed (" << s << " s)\n";
  for (const auto& n : failed_names) std::cout << "  FAILED: " << n << "\n";
  if (run == 0) {
    std::cout << "no case matched the selected groups\n";
    return 1;
  }
  return failed == 0 ? 0 : 1;
}
