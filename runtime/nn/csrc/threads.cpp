// The calling thread's OpenMP team pinned one thread per CPU (runtime/nn/kernels.py::bind_threads
// says why). Linux only: sched_setaffinity on each team thread, from inside one parallel region.
//
//   cpus [n]: thread t of the team (t = at::get_thread_num(), 0 = the calling thread) -> cpus[t % n]
//   returns [threads]: the CPU each thread was pinned to, -1 where the kernel refused
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <sched.h>

#include <vector>

namespace quiver {

std::vector<int64_t> bind_threads(const std::vector<int64_t>& cpus) {
  TORCH_CHECK(!cpus.empty(), "bind_threads: no CPUs given");
  const int64_t n = at::get_num_threads();
  std::vector<int64_t> bound(n, -1);
  // grain 1 over n indices: ATen gives each of the n team threads one index, so every thread
  // of the team runs the body once (which index it gets does not matter: it pins itself)
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int64_t t = at::get_thread_num();
    const int64_t cpu = cpus[t % static_cast<int64_t>(cpus.size())];
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(static_cast<int>(cpu), &set);
    if (t < n && sched_setaffinity(0, sizeof(set), &set) == 0) bound[t] = cpu;
  });
  return bound;
}

}  // namespace quiver
